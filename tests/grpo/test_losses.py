import doctest
import math

import pytest
import torch
from torch.testing import assert_close

import grpo.losses as losses_mod
from grpo.losses import AGG_MODES, KL_ESTIMATORS, POLICY_RATIOS, agg_loss, kl_penalty, policy_loss

E = math.e


# ------------------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------------------
LOGP = torch.tensor([0.0, -1.0, -2.0])
REF = torch.tensor([-1.0, -1.0, 0.0])  # d = ref - logp = [-1, 0, 2]


def test_kl_hand_computed():
    assert_close(kl_penalty(LOGP, REF, "k1"), torch.tensor([1.0, 0.0, -2.0]))  # logp - ref
    assert_close(kl_penalty(LOGP, REF, "k2"), torch.tensor([0.5, 0.0, 2.0]))  # d^2 / 2
    # k3 = e^d - d - 1: e^-1 + 1 - 1 = 0.36788; 1 - 0 - 1 = 0; e^2 - 2 - 1 = 4.38906
    assert_close(kl_penalty(LOGP, REF, "k3"), torch.tensor([1 / E, 0.0, E**2 - 3]))


def test_k3_gradient_and_clamp():
    # d k3 / d logp = 1 - e^d with d = ref - logp: [1 - 1/e, 0, 1 - e^2]
    logp = LOGP.clone().requires_grad_(True)
    kl_penalty(logp, REF, "k3").sum().backward()
    assert_close(logp.grad, torch.tensor([1 - 1 / E, 0.0, 1 - E**2]))
    # d = -1000 is clamped to -20: e^-20 + 20 - 1 (instead of 999); d = +100 -> e^20 - 21, finite.
    logp = torch.tensor([0.0, 0.0], requires_grad=True)
    got = kl_penalty(logp, torch.tensor([-1000.0, 100.0]), "k3")
    assert_close(got, torch.tensor([math.exp(-20) + 19, math.exp(20) - 21]))
    got.sum().backward()
    assert torch.equal(logp.grad, torch.zeros(2))  # the clamp is active: no gradient


def test_kl_dtypes_shapes_and_names():
    half = kl_penalty(LOGP.half(), REF.half(), "k3")
    assert half.dtype == torch.float32
    assert_close(half, kl_penalty(LOGP, REF, "k3"))
    assert kl_penalty(LOGP.double(), REF.double(), "k2").dtype == torch.float64
    with pytest.raises(ValueError, match=r"ref_logp must have logp's shape \(3,\), got \(2,\)"):
        kl_penalty(LOGP, REF[:2], "k1")
    with pytest.raises(KeyError, match="unknown KL estimator 'k4'; known: k1, k2, k3"):
        kl_penalty(LOGP, REF, "k4")
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_matches_elementwise_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    logp, ref = -torch.rand(4, 5, generator=gen) * 3, -torch.rand(4, 5, generator=gen) * 3
    for kind, f in {
        "k1": lambda a, b: a - b,
        "k2": lambda a, b: 0.5 * (a - b) ** 2,
        "k3": lambda a, b: math.exp(b - a) - (b - a) - 1,
    }.items():
        want = torch.tensor([[f(float(a), float(b)) for a, b in zip(ra, rb, strict=True)]
                             for ra, rb in zip(logp, ref, strict=True)])
        assert_close(kl_penalty(logp, ref, kind), want)


# ------------------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # row 2 is empty


def test_agg_hand_computed():
    assert_close(agg_loss(LOSS, MASK, "token-mean"), torch.tensor(7 / 3))  # (1 + 2 + 4) / 3
    # rows: mean(1, 2) = 1.5, mean(4) = 4; the empty row is left out -> 2.75
    assert_close(agg_loss(LOSS, MASK, "seq-mean-token-mean"), torch.tensor(2.75))
    assert_close(agg_loss(LOSS, MASK, "seq-mean-token-sum"), torch.tensor(3.5))  # (3 + 4) / 2
    assert_close(agg_loss(LOSS, MASK, "seq-mean-token-sum-norm"), torch.tensor(7 / 6))  # (3/3 + 4/3) / 2
    assert_close(agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_len=4), torch.tensor(0.875))
    assert_close(agg_loss(LOSS, MASK.bool(), "token-mean"), torch.tensor(7 / 3))
    assert AGG_MODES.names() == ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm",
                                 "token-mean"]


@pytest.mark.parametrize("mode", AGG_MODES.names())
def test_agg_all_empty_is_zero_with_zero_gradient(mode):
    x = torch.randn(3, 4, requires_grad=True)
    out = agg_loss(x, torch.zeros(3, 4), mode)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", AGG_MODES.names())
def test_agg_matches_loop(seed, mode):
    gen = torch.Generator().manual_seed(seed)
    n, t = 5, 6
    x = torch.randn(n, t, generator=gen, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=gen) < 0.6).double()
    mask[seed] = 0.0  # one empty row
    per_seq = []
    for i in range(n):
        toks = [float(x[i, j]) for j in range(t) if mask[i, j]]
        if not toks:
            continue
        per_seq.append({"seq-mean-token-mean": sum(toks) / len(toks), "seq-mean-token-sum": sum(toks),
                        "seq-mean-token-sum-norm": sum(toks) / 7, "token-mean": None}[mode])
    if mode == "token-mean":
        vals = [float(x[i, j]) for i in range(n) for j in range(t) if mask[i, j]]
        want = sum(vals) / len(vals)
    else:
        want = sum(per_seq) / len(per_seq)
    assert_close(agg_loss(x, mask, mode, max_len=7), torch.tensor(want, dtype=torch.float64))


def test_agg_errors():
    with pytest.raises(KeyError, match="unknown loss aggregation mode 'sum'"):
        agg_loss(LOSS, MASK, "sum")
    with pytest.raises(ValueError, match=r"mask must have loss_mat's shape \(3, 3\), got \(3, 2\)"):
        agg_loss(LOSS, MASK[:, :2], "token-mean")
    with pytest.raises(ValueError, match=r"loss_mat must be \[N, T\]"):
        agg_loss(LOSS[0], MASK[0], "token-mean")
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_len must be a positive int"):
            agg_loss(LOSS, MASK, "seq-mean-token-sum-norm", max_len=bad)


# ------------------------------------------------------------------------------------------------------------
# policy loss: hand-computed
# ------------------------------------------------------------------------------------------------------------
def _case():
    """Row 0 (A=+1) ratios [1.5, 1.0, 0.5]; row 1 (A=-1) ratios [1.1, 0.7, (2.0 padded)]."""
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ratios = torch.tensor([[1.5, 1.0, 0.5], [1.1, 0.7, 2.0]])
    logp = (old + ratios.log()).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logp, old, torch.tensor([1.0, -1.0]), mask


def test_vanilla_hand_computed_loss_metrics_and_gradient():
    # row 0, A=+1: min(rA, clip(r, .8, 1.2)A) = [min(1.5, 1.2), 1, min(.5, .8)] = [1.2, 1.0, 0.5] -> mean 0.9
    # row 1, A=-1: [min(-1.1, -1.1), min(-0.7, -0.8)] = [-1.1, -0.8] -> mean -0.95
    # seq-mean-token-mean: -(0.9 - 0.95) / 2 = 0.025
    logp, old, adv, mask = _case()
    loss, m = policy_loss(logp, old, adv, mask)
    assert_close(loss, torch.tensor(0.025))
    assert m["loss"] == pytest.approx(0.025, abs=1e-6) and m["pg_loss"] == pytest.approx(0.025, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(2 / 5)  # (0,0): A>0, r>1.2; (1,1): A<0, r<0.8
    assert m["ratio_mean"] == pytest.approx(4.8 / 5)  # 1.5 + 1 + 0.5 + 1.1 + 0.7; the padded 2.0 is out
    assert m["ratio_max"] == pytest.approx(1.5) and m["ratio_min"] == pytest.approx(0.5)
    approx = sum(r - 1 - math.log(r) for r in (1.5, 1.0, 0.5, 1.1, 0.7)) / 5  # = 0.0698094
    assert m["approx_kl"] == pytest.approx(approx, rel=1e-5)
    assert m["kl"] == 0.0 and m["kl_loss"] == 0.0 and m["dual_clip_frac"] == 0.0 and m["num_tokens"] == 5
    assert all(isinstance(v, float) for v in m.values())
    loss.backward()
    # d/dlogp of -(1/2)(1/|o_i|) r A on unclipped tokens, 0 on clipped or padded ones:
    # row 0: [0, -(1/2)(1/3)(1.0), -(1/2)(1/3)(0.5)]; row 1: [-(1/2)(1/2)(1.1)(-1), 0, 0]
    assert_close(logp.grad, torch.tensor([[0.0, -1 / 6, -1 / 12], [0.275, 0.0, 0.0]]))


def test_vanilla_token_mean_and_per_token_advantages():
    logp, old, adv, mask = _case()
    loss, _ = policy_loss(logp, old, adv, mask, agg="token-mean")
    assert_close(loss, torch.tensor(-0.16))  # -(1.2 + 1 + 0.5 - 1.1 - 0.8) / 5
    per_token = adv[:, None].expand(2, 3).clone()
    loss_tok, _ = policy_loss(logp, old, per_token, mask, agg="token-mean")
    assert_close(loss_tok, loss)


def test_kl_term_hand_computed():
    # d = ref - logp = ln 2 at token (0, 1), 0 elsewhere: k3 = 2 - ln 2 - 1 = 0.30685 there.
    logp, old, adv, mask = _case()
    d = torch.zeros(2, 3)
    d[0, 1] = math.log(2.0)
    ref = logp.detach() + d
    ref[1, 2] = float("nan")  # padding is ignored
    loss, m = policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    k = 1 - math.log(2.0)
    assert m["kl"] == pytest.approx(k / 5, rel=1e-5)
    assert m["kl_loss"] == pytest.approx(k / 3 / 2, rel=1e-5)  # seq-mean-token-mean of the KL
    assert_close(loss, torch.tensor(0.025 + 0.1 * k / 6))
    loss.backward()
    # extra gradient at (0, 1): beta (1/2)(1/3) (1 - e^d) = 0.1 / 6 * (1 - 2)
    assert_close(logp.grad, torch.tensor([[0.0, -1 / 6 - 0.1 / 6, -1 / 12], [0.275, 0.0, 0.0]]))
    # beta = 0 with a reference: the KL is measured but not in the loss
    loss0, m0 = policy_loss(logp, old, adv, mask, ref_logp=ref)
    assert_close(loss0, torch.tensor(0.025)) and m0["kl"] == pytest.approx(k / 5, rel=1e-5)


def test_clip_higher_is_asymmetric():
    # clip_high 0.28: r = 1.25 (A=+1) is not clipped, r = 1.3 is clipped to 1.28; clip_low 0.2: r = 0.75
    # (A=-1) is clipped to 0.8 -> surrogates [1.25, 1.28, -0.8] on three one-token rows.
    old = torch.zeros(3, 1)
    logp = torch.tensor([[1.25], [1.3], [0.75]]).log().requires_grad_(True)
    loss, m = policy_loss(logp, old, torch.tensor([1.0, 1.0, -1.0]), torch.ones(3, 1), clip_high=0.28)
    assert_close(loss, torch.tensor(-(1.25 + 1.28 - 0.8) / 3))
    assert m["clip_frac"] == pytest.approx(2 / 3)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-1.25 / 3], [0.0], [0.0]]))


def test_dual_clip():
    # A = -1, ratio 4 and c = 3: max(min(-4, -1.2), -3) = -3 -> loss 3, no gradient.
    # Without the dual clip: -4 -> loss 4, gradient -(r A) = 4. A ratio of 2 < c is left alone: loss 2.
    old = torch.zeros(1, 1)
    logp = torch.tensor([[math.log(4.0)]], requires_grad=True)
    loss, m = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_ratio_c=3.0)
    assert_close(loss, torch.tensor(3.0)) and m["dual_clip_frac"] == 1.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(1, 1))
    loss, m = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1))
    assert_close(loss, torch.tensor(4.0)) and m["dual_clip_frac"] == 0.0
    logp.grad = None
    loss.backward()
    assert_close(logp.grad, torch.tensor([[4.0]]))
    two = torch.tensor([[math.log(2.0)]])
    assert_close(policy_loss(two, old, torch.tensor([-1.0]), torch.ones(1, 1), clip_ratio_c=3.0)[0],
                 torch.tensor(2.0))
    # positive advantages are never dual-clipped: A=+1, ratio 4 -> clipped at 1.2 as usual
    assert_close(policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), clip_ratio_c=3.0)[0],
                 torch.tensor(-1.2))


def test_gspo_hand_computed():
    # row 0: log ratios [ln 2, 0] -> s = exp(ln 2 / 2) = sqrt 2 > 1.2, A=+1 -> clipped to 1.2, zero gradient
    # row 1: log ratios [ln .9, ln .9, (padded ln 5)] -> s = 0.9 -> surrogate 0.9 on each token
    # loss = -(1.2 + 0.9) / 2 = -1.05; row-1 gradient: -(1/2)(1/2) s A = -0.225 per valid token.
    old = torch.zeros(2, 3)
    logp = torch.tensor([[math.log(2.0), 0.0, 0.0], [math.log(0.9), math.log(0.9), math.log(5.0)]])
    logp.requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, m = policy_loss(logp, old, torch.tensor([1.0, 1.0]), mask, variant="gspo")
    assert_close(loss, torch.tensor(-1.05))
    assert m["ratio_mean"] == pytest.approx((2 * math.sqrt(2) + 1.8) / 4, rel=1e-6)
    assert m["clip_frac"] == pytest.approx(0.5)  # both tokens of row 0
    loss.backward()
    assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [-0.225, -0.225, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_gradient_equals_sequence_level_formula(seed):
    # GSPO: J = 1/G sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t (logp - old)); autograd through s_i.
    gen = torch.Generator().manual_seed(seed)
    n, t = 6, 5
    old = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 2
    logp = (old + 0.15 * torch.randn(n, t, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = (torch.rand(n, t, generator=gen) < 0.8).double()
    mask[:, 0] = 1.0
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    loss, _ = policy_loss(logp, old, adv, mask, variant="gspo", clip_low=0.05, clip_high=0.05)
    (grad,) = torch.autograd.grad(loss, logp)
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))  # [N]
    want_loss = -torch.minimum(s * adv, s.clamp(0.95, 1.05) * adv).mean()
    (want_grad,) = torch.autograd.grad(want_loss, logp)
    assert_close(loss, want_loss)
    assert_close(grad, want_grad)
    assert (grad != 0).any() and (grad == 0).all(dim=-1).any()  # some sequences clipped, some not


def test_empty_rows_and_padding_garbage():
    logp, old, adv, mask = _case()
    ref_loss, _ = policy_loss(logp, old, adv, mask)
    # append an all-padding row full of NaN / -inf: same loss, finite gradients, zero on the new row
    logp2 = torch.cat([logp.detach(), torch.full((1, 3), float("nan"))]).requires_grad_(True)
    old2 = torch.cat([old, torch.full((1, 3), -float("inf"))])
    mask2 = torch.cat([mask, torch.zeros(1, 3)])
    adv2 = torch.cat([adv, torch.tensor([float("nan")])])
    for agg in AGG_MODES.names():
        for variant in POLICY_RATIOS.names():
            loss, m = policy_loss(logp2, old2, adv2, mask2, agg=agg, variant=variant)
            want, _ = policy_loss(logp, old, adv, mask, agg=agg, variant=variant)
            assert_close(loss, want)
            (g,) = torch.autograd.grad(loss, logp2)
            assert torch.isfinite(g).all() and torch.equal(g[2], torch.zeros(3))
            assert all(math.isfinite(v) for v in m.values())
    assert_close(policy_loss(logp2, old2, adv2, mask2)[0], ref_loss)


def test_all_padding_gives_zero_loss_and_metrics():
    logp = torch.randn(2, 3, requires_grad=True)
    loss, m = policy_loss(logp, torch.randn(2, 3), torch.ones(2), torch.zeros(2, 3),
                          ref_logp=torch.randn(2, 3), beta=0.1)
    assert loss.item() == 0.0 and all(v == 0.0 for v in m.values())
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3))


def test_no_gradient_to_old_logp_or_advantages():
    logp, old, adv, mask = _case()
    old, adv = old.clone().requires_grad_(True), adv.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, mask)
    loss.backward()
    assert old.grad is None and adv.grad is None and logp.grad is not None


def test_policy_loss_errors():
    logp, old, adv, mask = _case()
    cases = [
        (dict(old_logp=old[:1]), r"old_logp must have logp's shape \(2, 3\), got \(1, 3\)"),
        (dict(mask=mask[:, :2]), r"mask must have logp's shape"),
        (dict(advantages=torch.ones(3)), r"advantages must be \[N\]=\(2,\) or \[N, T\]=\(2, 3\), got \(3,\)"),
        (dict(beta=0.1), r"beta=0.1 > 0 needs ref_logp"),
        (dict(beta=-1.0), r"beta must be >= 0"),
        (dict(clip_low=1.0), r"clip_low must be in \[0, 1\)"),
        (dict(clip_high=-0.1), r"clip_high must be >= 0"),
        (dict(clip_ratio_c=1.0), r"clip_ratio_c must be > 1"),
        (dict(ref_logp=old[:, :2]), r"ref_logp must have logp's shape"),
    ]
    for kw, msg in cases:
        args = dict(logp=logp, old_logp=old, advantages=adv, mask=mask) | kw
        pos = [args.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
        with pytest.raises(ValueError, match=msg):
            policy_loss(*pos, **args)
    with pytest.raises(ValueError, match=r"logp must be \[N, T\]"):
        policy_loss(logp[0], old[0], adv, mask[0])
    for kw, msg in [
        (dict(variant="ppo2"), "unknown policy loss variant 'ppo2'; known: gspo, vanilla"),
        (dict(agg="x"), "unknown loss aggregation mode"),
        (dict(kl="k9"), "unknown KL estimator"),
    ]:
        with pytest.raises(KeyError, match=msg):
            policy_loss(logp, old, adv, mask, **kw)


# ------------------------------------------------------------------------------------------------------------
# policy loss: vectorised vs a plain loop over sequences and tokens (values and gradients)
# ------------------------------------------------------------------------------------------------------------
def _loop_policy_loss(logp, old, adv, mask, ref, beta, agg, variant, clip_c, max_len):
    n, t = logp.shape
    seq_terms, all_terms = [], []
    for i in range(n):
        idx = [j for j in range(t) if mask[i, j] > 0]
        if not idx:
            continue
        if variant == "gspo":
            s = torch.exp(sum(logp[i, j] - old[i, j] for j in idx) / len(idx))
        terms = []
        for j in idx:
            r = torch.exp(logp[i, j] - old[i, j]) if variant == "vanilla" else s.detach() * torch.exp(
                logp[i, j] - logp[i, j].detach())
            a = float(adv[i])
            surr = torch.minimum(r * a, r.clamp(0.8, 1.28) * a)
            if clip_c is not None and a < 0:
                surr = torch.maximum(surr, torch.tensor(clip_c * a, dtype=surr.dtype))
            d = ref[i, j] - logp[i, j]
            terms.append(-(surr - beta * (torch.exp(d) - d - 1)))
        all_terms += terms
        seq_terms.append({"seq-mean-token-mean": sum(terms) / len(terms), "seq-mean-token-sum": sum(terms),
                          "seq-mean-token-sum-norm": sum(terms) / max_len, "token-mean": None}[agg])
    if agg == "token-mean":
        return sum(all_terms) / len(all_terms)
    return sum(seq_terms) / len(seq_terms)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("agg", AGG_MODES.names())
@pytest.mark.parametrize("variant", ["vanilla", "gspo"])
def test_policy_loss_matches_loop(seed, agg, variant):
    gen = torch.Generator().manual_seed(seed)
    n, t = 4, 5
    old = -torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(n, t, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ref = old + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=gen) < 0.7).double()
    mask[seed % n] = 0.0
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    clip_c = 1.3 if seed == 1 else None
    kw = dict(ref_logp=ref, beta=0.05, agg=agg, variant=variant, clip_high=0.28, max_len=6)
    loss, m = policy_loss(logp, old, adv, mask, clip_ratio_c=clip_c, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    want = _loop_policy_loss(logp, old, adv, mask, ref, 0.05, agg, variant, clip_c, 6)
    (want_grad,) = torch.autograd.grad(want, logp)
    assert_close(loss, want)
    assert_close(grad, want_grad)
    # metrics from a loop over valid tokens
    logp = logp.detach()
    valid = [(i, j) for i in range(n) for j in range(t) if mask[i, j]]
    ratios = {}
    for i, j in valid:
        row = [k for k in range(t) if mask[i, k]]
        lr = (sum(float(logp[i, k] - old[i, k]) for k in row) / len(row)) if variant == "gspo" else float(
            logp[i, j] - old[i, j])
        ratios[i, j] = math.exp(lr)
    clipped = sum(1 for (i, j), r in ratios.items() if (adv[i] > 0 and r > 1.28) or (adv[i] < 0 and r < 0.8))
    assert m["clip_frac"] == pytest.approx(clipped / len(valid))
    assert m["ratio_mean"] == pytest.approx(sum(ratios.values()) / len(valid))
    assert m["ratio_max"] == pytest.approx(max(ratios.values()))
    kl = [math.exp(float(ref[i, j] - logp[i, j])) - float(ref[i, j] - logp[i, j]) - 1 for i, j in valid]
    assert m["kl"] == pytest.approx(sum(kl) / len(kl))
    if seed == 2:
        assert 0 < m["clip_frac"] < 1  # the case exercises both branches
    if seed == 1 and variant == "vanilla":
        assert m["dual_clip_frac"] > 0


def test_bf16_inputs_run():
    logp, old, adv, mask = _case()
    loss, m = policy_loss(logp.detach().bfloat16().requires_grad_(True), old.bfloat16(), adv, mask,
                          ref_logp=old.bfloat16(), beta=0.04)
    assert torch.isfinite(loss) and math.isfinite(m["kl"])


def test_docstring_examples():
    assert doctest.testmod(losses_mod).failed == 0
