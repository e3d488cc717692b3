"""One-step off-policy rollouts: the next batch is sampled with the weights before this step's update, the
prompts keep their order, and a resumed run trains on exactly what the uninterrupted one does."""

import copy

import pytest

from grpo.config import GRPOConfig
from grpo.trainer import GRPOTrainer
from rollout.torch_engine import TorchEngine
from tests.helpers.tiny import count_target, tiny_llama, word_tokenizer

BATCHES = [[{"prompt": f"t{3 + i + k} t{9 + i} t{20 + k}", "parity": i % 2} for i in range(4)] for k in range(4)]


class WatchedEngine(TorchEngine):
    """Records the prompts and the weights (a checksum) of every generate call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def generate(self, prompt_token_ids, sampling):
        checksum = float(sum(p.double().sum() for p in self.model.parameters()))
        self.calls.append((list(map(tuple, prompt_token_ids)), checksum))
        return super().generate(prompt_token_ids, sampling)


def _trainer(**overrides):
    policy, tokenizer = tiny_llama(0).train(), word_tokenizer()
    cfg = dict(group_size=4, prompts_per_step=4, minibatch_size=16, micro_batch_size=8, lr=1e-2, beta=0.0,
               max_new_tokens=4, seed=0, async_rollouts=True)
    cfg.update(overrides)
    engine = WatchedEngine(copy.deepcopy(policy), tokenizer=tokenizer)
    return GRPOTrainer(policy, engine, count_target, tokenizer, GRPOConfig(**cfg))


def _run(trainer, batches, start=0):
    out = []
    for k in range(start, len(batches)):
        out.append(trainer.step(batches[k], next_rows=batches[k + 1] if k + 1 < len(batches) else None))
    return out


def test_the_next_batch_is_sampled_before_the_update_with_the_same_prompts_in_order():
    trainer = _trainer()
    metrics = _run(trainer, BATCHES)
    assert [m["async/staleness"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]  # the first batch is sampled fresh
    calls = trainer.engine.calls
    assert len(calls) == len(BATCHES)
    encoded = [[tuple(trainer.engine.tokenizer.encode(r["prompt"])) for r in b] for b in BATCHES]
    # the prompt ids the engine saw (chat-encoded) keep the batches' order: each call holds one batch
    assert [len(c[0]) for c in calls] == [len(e) for e in encoded]
    # batches 1 and 2 were both sampled before the first update; batch k+2 after update k only
    assert calls[0][1] == calls[1][1]
    assert calls[1][1] != calls[2][1] != calls[3][1]
    assert trainer.correction == "tis"  # one step behind, the engine is not the trainer


def test_sync_and_async_runs_see_the_same_prompts_in_the_same_order():
    sync, asynchronous = _trainer(async_rollouts=False), _trainer()
    for batch in BATCHES:
        sync.step(batch)
    _run(asynchronous, BATCHES)
    assert [c[0] for c in sync.engine.calls] == [c[0] for c in asynchronous.engine.calls]


def test_a_resumed_async_run_trains_on_what_the_uninterrupted_one_does():
    full = _run(_trainer(), BATCHES)
    first = _trainer()
    for k in range(2):  # two steps, the third batch already sampled ahead
        first.step(BATCHES[k], next_rows=BATCHES[k + 1])
    state = copy.deepcopy(first.state_dict())
    assert state["pending"] is not None and state["pending"][0] == BATCHES[2]
    resumed = _trainer()
    resumed.load_state_dict(state)
    rest = _run(resumed, BATCHES, start=2)
    for want, got in zip(full[2:], rest):
        for key in ("loss", "reward/mean", "mismatch/logp_abs_mean", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key


def test_async_settings_are_validated():
    with pytest.raises(ValueError, match="max_staleness: only 1"):
        GRPOConfig(async_rollouts=True, max_staleness=2)
    with pytest.raises(ValueError, match="async_rollouts cannot be combined with dynamic_sampling"):
        GRPOConfig(async_rollouts=True, dynamic_sampling=True)
    trainer = _trainer()
    trainer.step(BATCHES[0], next_rows=BATCHES[1])
    with pytest.raises(RuntimeError, match="not the ones sampled ahead"):
        trainer.step(BATCHES[2])
