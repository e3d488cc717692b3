"""The GRPO trainer end to end on tiny models (transformers Llama here; our MoE model in the model tests)."""

import copy

import pytest
import torch

from grpo.batch import pad_trajectories
from grpo.config import GRPOConfig
from grpo.trainer import GRPOTrainer
from rollout.torch_engine import TorchEngine
from tests.helpers.tiny import count_target, tiny_llama, word_tokenizer

PROMPT_ROWS = [{"prompt": f"t{3 + i} t{9 + i} t{20 + i}", "parity": i % 2} for i in range(8)]


def make_trainer(seed=0, **overrides):
    cfg = dict(group_size=4, prompts_per_step=4, minibatch_size=16, micro_batch_size=8, lr=1e-2, beta=0.0,
               max_new_tokens=4, temperature=1.0, seed=seed)
    cfg.update(overrides)
    policy, tokenizer = tiny_llama(seed).train(), word_tokenizer()
    engine = TorchEngine(copy.deepcopy(policy), tokenizer=tokenizer)
    return GRPOTrainer(policy, engine, count_target, tokenizer, GRPOConfig(**cfg))


def test_pad_trajectories_layout():
    ids, attn, comp = pad_trajectories([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert ids.tolist() == [[5, 6, 8, 0, 0], [0, 7, 9, 10, 11]]
    assert attn.tolist() == [[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert comp.tolist() == [[1, 0, 0], [1, 1, 1]]


def test_config_rejects_bad_batch_shapes():
    with pytest.raises(ValueError, match=r"minibatch_size \(5\) must divide prompts_per_step \* group_size"):
        GRPOConfig(group_size=4, prompts_per_step=2, minibatch_size=5, micro_batch_size=5)
    with pytest.raises(ValueError, match="micro_batch_size"):
        GRPOConfig(group_size=4, prompts_per_step=2, minibatch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match="loss_agg must be one of"):
        GRPOConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="unknown GRPO setting"):
        GRPOConfig.from_dict({"grop_size": 4})


def test_one_step_changes_every_parameter_and_syncs_engine():
    trainer = make_trainer(beta=0.04, micro_batch_size=4)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    metrics = trainer.step(PROMPT_ROWS[:4])
    for name, p in trainer.policy.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"
    for (n1, p1), (n2, p2) in zip(trainer.policy.state_dict().items(), trainer.engine.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), f"engine weight {n1} is stale"
    for key in ("reward/mean", "reward/std", "kl", "clip_frac", "entropy", "completion/length_mean",
                "tokens_per_s", "time/generate", "time/score", "time/update", "time/sync", "grad_norm", "lr"):
        assert key in metrics, key


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_micro_batch_accumulation_equals_one_pass(mask_truncated):
    for agg in ("token-mean", "seq-mean-token-mean"):
        grads = []
        for micro in (16, 4):
            trainer = make_trainer(seed=1, micro_batch_size=micro, loss_agg=agg, max_grad_norm=0.0,
                                   mask_truncated=mask_truncated, max_new_tokens=3)
            torch.manual_seed(0)
            rollouts = trainer.generate(PROMPT_ROWS[:4])
            scores = trainer.score(PROMPT_ROWS[:4], rollouts)
            rewards = torch.tensor(scores.total)
            adv = (rewards - rewards.view(4, 4).mean(1).repeat_interleave(4))
            batch = trainer._trajectories(rollouts, adv, rewards)
            trainer.optimizer.step = lambda: None  # keep the gradients, skip the update
            trainer._minibatch_step(batch)
            grads.append([p.grad.clone() for p in trainer.policy.parameters()])
        for g16, g4 in zip(*grads):
            torch.testing.assert_close(g16, g4, atol=1e-6, rtol=1e-4)


def test_dynamic_sampling_drops_flat_groups_and_refills():
    def flat_for_first(prompts, completions, **_):
        return [0.0 if p == PROMPT_ROWS[0]["prompt"] else float(len(c)) for p, c in zip(prompts, completions)]

    trainer = make_trainer(dynamic_sampling=True)
    trainer.reward_fn = flat_for_first
    calls = []

    def refill(k):
        calls.append(k)
        return PROMPT_ROWS[4:4 + k]

    metrics = trainer.step(PROMPT_ROWS[:4], refill=refill)
    assert calls == [1]
    assert metrics["dynamic_sampling/dropped_groups"] == 1.0
    assert metrics["dynamic_sampling/kept_groups"] == 4.0


def test_mask_truncated_removes_loss_of_cut_completions():
    trainer = make_trainer(mask_truncated=True, max_new_tokens=2)
    rollouts = trainer.generate(PROMPT_ROWS[:4])
    rewards = torch.zeros(len(rollouts))
    batch = trainer._trajectories(rollouts, rewards, rewards)
    for row, r in zip(batch.completion_mask, rollouts):
        assert int(row.sum()) == (0 if r.finish_reason == "length" else len(r.completion_ids))


def test_reward_rises_on_learnable_reward():
    trainer = make_trainer(seed=3, lr=3e-2, group_size=8, prompts_per_step=4, minibatch_size=32,
                           micro_batch_size=32, max_new_tokens=3)
    history = [trainer.step(PROMPT_ROWS[:4])["reward/mean"] for _ in range(25)]
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last > first + 0.3, history


def test_resume_from_state_dict_matches_uninterrupted():
    a = make_trainer(seed=4)
    for _ in range(2):
        a.step(PROMPT_ROWS[:4])
    state = copy.deepcopy(a.state_dict())
    a.step(PROMPT_ROWS[:4])
    b = make_trainer(seed=9)
    b.load_state_dict(state)
    b.step(PROMPT_ROWS[:4])
    for (n, p), q in zip(a.policy.named_parameters(), b.policy.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_trains_our_moe_model_with_balance_loss_and_bias_update():
    from model import DeepSeekConfig, DeepSeekForCausalLM

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    cfg = DeepSeekConfig.from_preset("tiny", vocab_size=len(tokenizer), hidden_size=32, moe_intermediate_size=16,
                                     intermediate_size=64, num_hidden_layers=2, eos_token_id=1, bos_token_id=2,
                                     pad_token_id=0)
    policy = DeepSeekForCausalLM(cfg).train()
    engine = TorchEngine(copy.deepcopy(policy).eval(), tokenizer=tokenizer)
    trainer = GRPOTrainer(policy, engine, count_target, tokenizer,
                          GRPOConfig(group_size=4, prompts_per_step=4, minibatch_size=16, micro_batch_size=16,
                                     lr=1e-2, beta=0.04, max_new_tokens=6, moe_aux_coef=0.01,
                                     moe_bias_gamma=1e-3))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    bias_before = policy.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    metrics = trainer.step(PROMPT_ROWS[:4])
    unchanged = [n for n, p in policy.named_parameters() if torch.equal(before[n], p.detach())]
    assert not unchanged, unchanged
    assert metrics["moe_aux_loss"] > 0
    assert any(k.startswith("moe/layer1") for k in metrics)
    assert not torch.equal(bias_before, policy.model.layers[1].mlp.gate.e_score_correction_bias)
    # the engine follows: its HF-named weights equal the policy's after the step
    for (n1, t1), (n2, t2) in zip(policy.named_hf_weights(), engine.model.named_hf_weights()):
        assert n1 == n2 and torch.equal(t1, t2), n1
