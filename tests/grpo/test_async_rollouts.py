"""One-step off-policy rollouts: the next batch is sampled with the weights before this step's update, the
prompts keep their order, and a resumed run trains on exactly what the uninterrupted one does."""

import copy
import threading
import time

import pytest
import torch

from grpo.batch import Scores, pad_trajectories
from grpo.config import GRPOConfig
from grpo.logprobs import sequence_logprobs
from grpo.prefetch import WorkAhead
from grpo.trainer import GRPOTrainer
from rollout.base import PendingRollouts, Rollout
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
    for m in metrics[1:]:  # the rate of a batch sampled during the last step is per second of this step
        tokens = m["completion/length_mean"] * 16
        assert tokens / m["tokens_per_s"] >= 0.5 * m["time/step"] > 10 * m["time/generate"]
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


class ThreadedReference:
    """A remote-style reference (``logprobs`` / ``update_weights``) over a local copy, recording the thread of
    every call."""

    def __init__(self, model):
        self.model, self.threads = model.eval().requires_grad_(False), []

    def logprobs(self, input_ids, attention_mask, completion_len, **kw):
        self.threads.append(threading.current_thread().name)
        with torch.no_grad():
            return sequence_logprobs(self.model, input_ids, attention_mask, completion_len, **kw)[0]

    def update_weights(self, named):
        self.model.load_state_dict(dict(named), strict=False)


def _with_reference(monkeypatch=None, **overrides):
    trainer = _trainer(beta=0.05, **overrides)
    trainer.ref_model = ThreadedReference(copy.deepcopy(trainer.policy))
    if monkeypatch is not None:  # the same run with the prefetch off
        monkeypatch.setattr(trainer, "_prefetches_reference", lambda: False)
    return trainer


@pytest.mark.parametrize("reset_every", [0, 2])
def test_the_reference_log_probs_of_the_batch_sampled_ahead_are_computed_while_the_step_trains(monkeypatch,
                                                                                               reset_every):
    prefetching = _with_reference(ref_reset_every=reset_every)
    got = _run(prefetching, BATCHES)
    plain = _run(_with_reference(monkeypatch, ref_reset_every=reset_every), BATCHES)
    # no reset: every batch after the first was prefetched; a reset after step 2 replaces the reference, so the
    # batch sampled during it is not prefetched (it would hold the old reference's log-probs)
    want = [0.0, 1.0, 1.0, 1.0] if not reset_every else [0.0, 1.0, 0.0, 1.0]
    assert [m["async/reference_prefetched"] for m in got] == want
    threads = prefetching.ref_model.threads  # (in any order: a prefetch may run beside the step's own call)
    assert sorted(threads) == sorted("work-ahead" if w else "MainThread" for w in want)
    assert [m["async/scores_prefetched"] for m in got] == [0.0, 1.0, 1.0, 1.0]  # scores: with or without reset
    for a, b in zip(got, plain):  # the same reference log-probs, so the same KL and update
        for key in ("kl", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key


def test_work_ahead_is_used_only_for_what_it_computed_and_its_errors_reach_the_trainer():
    rollouts = [Rollout([1, 2], [3, 4, 5], [], "stop")]
    scores = Scores([1.0])
    work = WorkAhead(PendingRollouts.done(rollouts), lambda done: scores,
                     lambda ids, attn, t: torch.zeros(len(ids), t), 0)
    ids, attn, _ = pad_trajectories([[1, 2]], [[3, 4, 5]], 0)
    assert work.scores(rollouts) is scores
    assert work.scores([Rollout([1, 2], [3, 4, 5], [], "stop")]) is None  # other rollouts, even if equal
    assert work.reference_logprobs(ids, attn).shape == (1, 3)
    assert work.reference_logprobs(ids.flip(1), attn) is None  # other tokens: the trainer computes them itself
    assert work.reference_logprobs(ids[:, :-1], attn[:, :-1]) is None
    work.discard_reference()  # the reference was replaced
    assert work.reference_logprobs(ids, attn) is None and work.scores(rollouts) is scores

    def broken(*args):
        raise RuntimeError("reward worker died")

    failed = WorkAhead(PendingRollouts.done(rollouts), broken, None, 0)
    with pytest.raises(RuntimeError, match="reward worker died"):
        failed.scores(rollouts)
    assert WorkAhead(PendingRollouts.done(rollouts), lambda d: scores, None, 0).reference_logprobs(ids, attn) is None


def test_the_reward_sees_the_batches_in_order_one_call_at_a_time():
    calls, busy = [], threading.Lock()

    def slow_reward(prompts, completions, **columns):
        assert busy.acquire(blocking=False), "the reward was called while another call was running"
        try:
            time.sleep(0.05)  # a window for a second call to overlap this one
            calls.append(prompts[0])
            return count_target(prompts, completions, **columns)
        finally:
            busy.release()

    trainer = _trainer()
    trainer.reward_fn = slow_reward
    metrics = _run(trainer, BATCHES)
    assert calls == [b[0]["prompt"] for b in BATCHES]
    assert [m["async/scores_prefetched"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
