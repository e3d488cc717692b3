"""Process supervision through the trainer: step rewards -> token step ends -> per-token advantages."""

import copy
import math

import pytest
import torch

import grpo.trainer as trainer_module
from grpo.config import GRPOConfig
from grpo.steps import check_step_rewards, step_groups_flat, token_step_ends
from grpo.trainer import GRPOTrainer
from rewards import StepRewards, step_ends
from rollout.base import Rollout
from tests.helpers.tiny import tiny_llama, word_tokenizer

# ------------------------------------------------------------------------------------------------ pieces


def test_step_ends_split_on_the_separator():
    assert step_ends("a\nbb \n\nc") == [1, 4, 8]  # trailing blanks left out, the empty step skipped
    assert step_ends("x y ", sep=" ") == [1, 3]
    assert step_ends("a. b. c", sep=". ") == [2, 5, 7]
    assert step_ends("") == []
    with pytest.raises(ValueError, match="sep"):
        step_ends("a", sep="")


@pytest.mark.parametrize(("scores", "ends", "match"), [
    ((1.0,), (), "1 scores but 0 ends"),
    ((float("nan"),), (3,), r"scores\[0\]"),
    ((1.0, 2.0), (4, 2), "non-decreasing"),
    ((1.0,), (0,), r"ends\[0\]"),
    ((True,), (1,), r"scores\[0\]"),
])
def test_step_rewards_validation_names_the_field(scores, ends, match):
    with pytest.raises(ValueError, match=match):
        StepRewards(scores, ends)


def test_token_step_ends_find_the_token_that_completes_each_step():
    pieces = ["ab", "c\n", "", "de", "\n"]  # token 2 decodes to nothing (e.g. half of a character)
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    ids = list(range(len(pieces)))
    # text "abc\nde\n": offsets 1..2 end in token 0, 3..4 in token 1, 5..6 in token 3, 7 in token 4
    assert token_step_ends(decode, ids, [1, 2, 3, 4, 5, 6, 7]) == [0, 0, 1, 1, 3, 3, 4]
    assert token_step_ends(decode, ids, [99]) == [4]  # past the text: the last token
    assert token_step_ends(decode, [], [3]) == [0]


def test_token_step_ends_with_a_real_tokenizer():
    tok = word_tokenizer()
    ids = tok("t3 t4 t5 t6")["input_ids"]
    decode = lambda x: tok.decode(x)  # noqa: E731
    text = decode(ids)
    assert token_step_ends(decode, ids, step_ends(text, sep=" ")) == [0, 1, 2, 3]


def test_check_step_rewards():
    steps = check_step_rewards([StepRewards((1.0,), (2,)), None], 2)
    assert steps[1] == StepRewards((), ()) and steps[1].mean == 0.0
    with pytest.raises(ValueError, match="2 items for 3 completions"):
        check_step_rewards([None, None], 3)
    with pytest.raises(ValueError, match="completion 0: .*StepRewards"):
        check_step_rewards([1.0], 1)
    assert step_groups_flat([StepRewards((1.0, 1.0), (1, 2)), StepRewards((), ())])
    assert not step_groups_flat([StepRewards((1.0, 0.0), (1, 2))])


# ------------------------------------------------------------------------------------------------ trainer
COMPLETIONS = [  # two prompts x G=3: words are steps; a word scores 1 when its number is even
    ["t4 t6 t7", "t5 t8", "t9 t9 t9 t10"],
    ["t3 t3", "t4", "t12 t5"],
]


class FixedEngine:
    """Returns the same completions every call (word tokens, one word = one step)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, prompt_ids, sampling):
        out = []
        for p, prompt in enumerate(prompt_ids):
            for text in COMPLETIONS[p]:
                ids = self.tokenizer(text)["input_ids"]
                out.append(Rollout(prompt_ids=list(prompt), completion_ids=ids, logprobs=[], finish_reason="stop",
                                   text=self.tokenizer.decode(ids), prompt_index=p))
        return out

    def update_weights(self, named):
        pass


def word_steps(prompts, completions, **_):
    out = []
    for text in completions:
        ends = step_ends(text, sep=" ")
        words = text.split()
        out.append(StepRewards([float(int(w[1:]) % 2 == 0) for w in words], ends))
    return out


def _expected(eps=1e-6):
    """The DeepSeekMath formula, one loop per group: A[i, t] = sum over steps j of i ending at or after t of
    (r_j - mean) / (std + eps), with the group's mean and unbiased std over all its step rewards."""
    rows = []
    for group in COMPLETIONS:
        scores = [[float(int(w[1:]) % 2 == 0) for w in text.split()] for text in group]
        flat = [s for row in scores for s in row]
        mean = sum(flat) / len(flat)
        std = math.sqrt(sum((s - mean) ** 2 for s in flat) / (len(flat) - 1))
        for row in scores:
            rows.append([sum((r - mean) / (std + eps) for j, r in enumerate(row) if j >= t) for t in range(4)])
    return torch.tensor(rows)


def _trainer(**overrides):
    tok = word_tokenizer()
    cfg = dict(group_size=3, prompts_per_step=2, minibatch_size=6, micro_batch_size=6, lr=1e-3, beta=0.0,
               max_new_tokens=4, advantage="process")
    cfg.update(overrides)
    return GRPOTrainer(tiny_llama(0).train(), FixedEngine(tok), word_steps, tok, GRPOConfig(**cfg))


def test_trainer_turns_step_rewards_into_per_token_advantages(monkeypatch):
    seen = []
    original = trainer_module.policy_loss

    def spy(logp, old, advantages, mask, **kw):
        seen.append((advantages.clone(), mask.clone()))
        return original(logp, old, advantages, mask, **kw)

    monkeypatch.setattr(trainer_module, "policy_loss", spy)
    trainer = _trainer()
    rows = [{"prompt": "t3 t4"}, {"prompt": "t5"}]
    want = _expected()
    rollouts = trainer.generate(rows)
    mask = torch.tensor([[float(t < len(r.completion_ids)) for t in range(4)] for r in rollouts])
    torch.testing.assert_close(trainer._advantages(rollouts, trainer.score(rows, rollouts)) * mask, want * mask)

    before = copy.deepcopy(trainer.policy.state_dict())
    metrics = trainer.step(rows)
    (advantages, loss_mask), = seen  # the update shuffles rows: compare as a set of rows
    assert advantages.shape == want.shape == (6, 4)
    got = sorted((advantages * loss_mask).round(decimals=4).tolist())
    assert got == sorted((want * mask).round(decimals=4).tolist())
    # the mean step score of each completion is what the reward metric reports
    means = [sum(int(w[1:]) % 2 == 0 for w in t.split()) / len(t.split()) for g in COMPLETIONS for t in g]
    assert metrics["reward/mean"] == pytest.approx(sum(means) / len(means))
    assert any(not torch.equal(before[k], v) for k, v in trainer.policy.state_dict().items())


def test_process_advantage_needs_step_rewards():
    trainer = _trainer()
    trainer.reward_fn = lambda prompts, completions, **_: [1.0] * len(completions)
    with pytest.raises(ValueError, match="completion 0: advantage 'process' needs StepRewards"):
        trainer.step([{"prompt": "t3"}, {"prompt": "t4"}])


def test_dynamic_sampling_drops_groups_whose_steps_all_score_the_same():
    trainer = _trainer(dynamic_sampling=True)
    trainer.reward_fn = lambda prompts, completions, **_: [
        StepRewards([1.0] * len(c.split()), step_ends(c, sep=" ")) if i < 3 else word_steps(None, [c])[0]
        for i, c in enumerate(completions)]
    metrics = trainer.step([{"prompt": "t3"}, {"prompt": "t4"}])
    assert metrics["dynamic_sampling/dropped_groups"] == 1.0
    assert metrics["dynamic_sampling/kept_groups"] == 1.0


def test_a_recipe_stage_takes_one_process_reward():
    from grpo.orchestration.recipe import RLPhase
    from rewards import RewardSpec

    process = GRPOConfig(advantage="process")
    RLPhase(rewards=[RewardSpec("tests.grpo.test_steps:word_steps")], grpo=process)
    with pytest.raises(ValueError, match="one process reward"):
        RLPhase(rewards=[RewardSpec("accuracy"), RewardSpec("format")], grpo=process)


def test_reward_worker_passes_step_rewards_through():
    from grpo.orchestration.workers import RewardWorker

    worker = RewardWorker([{"name": "tests.grpo.test_steps:word_steps"}], process=True)
    out = worker.score(["p"], ["t4 t5"], {})
    assert out == [StepRewards((1.0, 0.0), (2, 5))]
