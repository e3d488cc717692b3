"""The rollout-training mismatch and its importance-sampling corrections: hand-computed weights, the trainer's
logged mismatch with an exact engine and with a perturbed one, and ``auto``."""

import copy
import math

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.correction import correction_weights, mismatch_metrics, mismatch_stats, resolve
from grpo.losses import policy_loss
from grpo.trainer import GRPOTrainer
from rollout.torch_engine import TorchEngine
from tests.helpers.tiny import count_target, tiny_llama, word_tokenizer

# two sequences: 3 tokens and 2 tokens (+1 padding); log rho = old - engine
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, 7.0]])
ENGINE = torch.tensor([[-1.0 - math.log(3.0), -2.0 + math.log(4.0), -0.5 - math.log(1.5)],
                       [-0.2 + math.log(1.25), -3.0 - math.log(1.25), float("nan")]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
# rho: [[3, 1/4, 1.5], [0.8, 1.25, -]]


@pytest.mark.parametrize("kind, weights, affected", [
    ("none", [[1, 1, 1], [1, 1, 1]], 0),
    ("tis", [[2, 0.25, 1.5], [0.8, 1.25, 1]], 1),  # min(rho, C=2)
    ("mis", [[0, 0, 1.5], [0.8, 1.25, 1]], 2),  # rho outside [1/2, 2] dropped
    # sequence geometric means: (3 * 1/4 * 1.5)^(1/3) = 1.125^(1/3); (0.8 * 1.25)^(1/2) = 1
    ("seq-tis", [[1.125 ** (1 / 3)] * 3, [1, 1, 1]], 0),
    ("seq-mis", [[1.125 ** (1 / 3)] * 3, [1, 1, 1]], 0),
])
def test_correction_weights_equal_hand_computed_values(kind, weights, affected):
    weight, hit = correction_weights(OLD, ENGINE, MASK, kind, cap=2.0)
    torch.testing.assert_close(weight, torch.tensor(weights, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    assert int(hit.sum()) == affected


def test_sequence_variants_truncate_and_drop_whole_sequences():
    engine = ENGINE.clone()
    engine[0] -= math.log(8.0)  # sequence 0's geometric-mean ratio x8: 8 * 1.125^(1/3)
    tis, hit = correction_weights(OLD, engine, MASK, "seq-tis", cap=2.0)
    assert tis[0].tolist() == [2.0, 2.0, 2.0] and hit[0].all() and not hit[1].any()
    mis, hit = correction_weights(OLD, engine, MASK, "seq-mis", cap=2.0)
    assert mis[0].tolist() == [0.0, 0.0, 0.0] and hit[0].all()
    torch.testing.assert_close(mis[1], torch.ones(3))


def test_mismatch_stats_by_hand():
    stats = mismatch_stats(OLD, ENGINE, MASK)
    rho = torch.tensor([3.0, 0.25, 1.5, 0.8, 1.25])
    assert stats["tokens"] == 5
    assert stats["abs_sum"] == pytest.approx(float(rho.log().abs().sum()), rel=1e-6)
    assert stats["abs_max"] == pytest.approx(math.log(4.0), rel=1e-6)
    assert stats["kl_sum"] == pytest.approx(float((rho - rho.log() - 1).sum()), rel=1e-6)
    metrics = mismatch_metrics(stats, affected=1)
    assert metrics["mismatch/corrected_frac"] == pytest.approx(0.2)


def test_the_weight_scales_the_policy_gradient_term_not_the_kl_term():
    logp = OLD.clone().requires_grad_(True)
    adv, ref = torch.tensor([1.0, -1.0]), OLD - 0.1
    weight, _ = correction_weights(OLD, ENGINE, MASK, "tis", cap=2.0)
    plain, _ = policy_loss(logp, OLD, adv, MASK, agg="token-mean", ref_logp=ref, beta=0.0)
    weighted, _ = policy_loss(logp, OLD, adv, MASK, agg="token-mean", ref_logp=ref, beta=0.0, pg_weight=weight)
    # at ratio 1 the surrogate is A per token: the weighted loss is -mean(w * A)
    assert float(plain.detach()) == pytest.approx(-(3 - 2) / 5)
    signed = weight * torch.tensor([[1.0] * 3, [-1.0] * 3])
    assert float(weighted.detach()) == pytest.approx(-float(signed[MASK.bool()].sum()) / 5)
    kl_only = policy_loss(logp, OLD, torch.zeros(2), MASK, agg="token-mean", ref_logp=ref, beta=0.5)[0]
    kl_weighted = policy_loss(logp, OLD, torch.zeros(2), MASK, agg="token-mean", ref_logp=ref, beta=0.5,
                              pg_weight=weight)[0]
    assert float(kl_weighted.detach()) == pytest.approx(float(kl_only.detach()))


def test_auto_resolves_by_the_engine():
    assert resolve("auto", engine_matches_trainer=True) == "none"
    assert resolve("auto", engine_matches_trainer=False) == "tis"
    assert resolve("mis", engine_matches_trainer=True) == "mis"
    with pytest.raises(ValueError, match="rollout_correction must be auto or one of"):
        GRPOConfig(rollout_correction="ips")
    with pytest.raises(ValueError, match="rollout_correction_cap must be > 1"):
        GRPOConfig(rollout_correction_cap=1.0)


def _trainer(engine_model=None, **overrides):
    policy, tokenizer = tiny_llama(0).train(), word_tokenizer()
    engine = TorchEngine(engine_model if engine_model is not None else copy.deepcopy(policy), tokenizer=tokenizer)
    cfg = dict(group_size=4, prompts_per_step=4, minibatch_size=16, micro_batch_size=8, lr=1e-3, beta=0.0,
               max_new_tokens=6, temperature=1.0, seed=0, sync_check=False)
    cfg.update(overrides)
    return GRPOTrainer(policy, engine, count_target, tokenizer, GRPOConfig(**cfg))


ROWS = [{"prompt": f"t{3 + i} t{9 + i} t{20 + i}", "parity": i % 2} for i in range(4)]


@pytest.mark.parametrize("off_policy", [False, True])
def test_an_exact_float32_engine_shows_no_mismatch_and_auto_chooses_none(off_policy):
    trainer = _trainer(**({"minibatch_size": 8} if off_policy else {}))
    assert trainer.correction == "none"
    metrics = trainer.step(ROWS)
    assert metrics["mismatch/logp_abs_mean"] < 1e-5
    assert metrics["mismatch/logp_abs_max"] < 1e-5
    assert abs(metrics["mismatch/kl"]) < 1e-8
    assert metrics["mismatch/corrected_frac"] == 0.0


def test_a_perturbed_engine_raises_the_mismatch_and_bfloat16_is_corrected():
    def perturbed(dtype=torch.float32):
        model = tiny_llama(0).to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return model

    trainer = _trainer(perturbed(), sync_check=False)
    trainer.sync_weights = lambda *a, **k: None  # keep the engine off the trainer's weights
    metrics = trainer.step(ROWS)
    assert metrics["mismatch/logp_abs_mean"] > 1e-3 and metrics["mismatch/kl"] > 1e-5
    assert trainer.correction == "none"  # still our float32 engine: auto trusts it

    bf16 = _trainer(perturbed(torch.bfloat16), rollout_correction="auto")
    assert bf16.correction == "tis"  # a bfloat16 engine is not the trainer
    bf16.sync_weights = lambda *a, **k: None
    tight = _trainer(perturbed(), rollout_correction="mis", rollout_correction_cap=1.01)
    tight.sync_weights = lambda *a, **k: None
    assert tight.step(ROWS)["mismatch/corrected_frac"] > 0.0
