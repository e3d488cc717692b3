"""token_logprobs: hand-computed values, chunked reference vs the naive definition, Triton vs both."""

import math

import pytest
import torch

import grpo_kernels
from grpo_kernels.token_logprobs import IGNORE_INDEX, naive_token_logprobs
from tests.helpers.kernels import (
    DEVICE,
    ON_GPU,
    assert_close,
    assert_grad_close,
    fresh_process_test,
    needs_triton,
    require_triton_in_process,
)


def make_inputs(n, v, h, dtype, seed=0, device="cpu", ignore=(3,)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h) * 2
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignore:
        if i < n:
            labels[i] = IGNORE_INDEX
    g_lp = torch.randn(n, generator=g, dtype=torch.float64)
    g_ent = torch.randn(n, generator=g, dtype=torch.float64)
    cast = dict(dtype=dtype, device=device)
    return (
        hidden.to(**cast).requires_grad_(),
        weight.to(**cast).requires_grad_(),
        labels.to(device),
        g_lp.to(device),
        g_ent.to(device),
    )


def run_and_grad(fn, hidden, weight, labels, g_lp, g_ent, with_entropy=True, **kw):
    lp, ent = fn(hidden, weight, labels, with_entropy=with_entropy, **kw)
    loss = (lp * g_lp.to(lp.dtype)).sum()
    if with_entropy:
        loss = loss + (ent * g_ent.to(ent.dtype)).sum()
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return lp.detach(), None if ent is None else ent.detach(), gh, gw


def naive64(hidden, weight, labels, g_lp, g_ent, temperature=1.0, with_entropy=True):
    """The naive definition in float64 on CPU, from the same (possibly low-precision) input values."""
    h = hidden.detach().double().cpu().requires_grad_()
    w = weight.detach().double().cpu().requires_grad_()

    def fn(hh, ww, yy, with_entropy):
        return naive_token_logprobs(hh, ww, yy, temperature, with_entropy)

    return run_and_grad(fn, h, w, labels.cpu(), g_lp.cpu(), g_ent.cpu(), with_entropy)


def test_hand_computed_single_token():
    # logits = [0, 1, 2] (hidden 1, weight column [0, 1, 2]); label 2.
    hidden = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    lp, ent = grpo_kernels.token_logprobs(hidden, weight, torch.tensor([2]))
    lse = math.log(1 + math.e + math.e**2)
    p = [math.exp(z - lse) for z in (0, 1, 2)]
    assert lp.item() == pytest.approx(2 - lse, abs=1e-12)
    assert ent.item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-12)
    # d logp / d hidden = sum_v (onehot - p)_v * w_v = 2 - (p1 + 2 p2)
    (gh,) = torch.autograd.grad(lp.sum(), hidden)
    assert gh.item() == pytest.approx(2 - (p[1] + 2 * p[2]), abs=1e-12)


def test_temperature_divides_logits():
    hidden, weight, labels, _, _ = make_inputs(5, 7, 3, torch.float64, ignore=())
    lp_t, ent_t = grpo_kernels.token_logprobs(hidden, weight, labels, temperature=0.5)
    lp_1, ent_1 = grpo_kernels.token_logprobs(hidden * 2, weight, labels)
    assert_close(lp_t, lp_1, torch.float64, "logprobs")
    assert_close(ent_t, ent_1, torch.float64, "entropy")


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 64, None])
def test_reference_equals_naive_float64(chunk_size, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    hidden, weight, labels, g_lp, g_ent = make_inputs(37, 101, 24, torch.float64)
    got = run_and_grad(
        grpo_kernels.token_logprobs, hidden, weight, labels, g_lp, g_ent, temperature=0.7, chunk_size=chunk_size
    )
    want = naive64(hidden, weight, labels, g_lp, g_ent, temperature=0.7)
    for name, a, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, want, strict=True):
        assert_close(a, b, torch.float64, name)


def test_reference_gradcheck(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    hidden, weight, labels, _, _ = make_inputs(6, 9, 4, torch.float64, ignore=(2,))

    def fn(h, w):
        return grpo_kernels.token_logprobs(h, w, labels, temperature=1.3, chunk_size=4)

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_ignored_tokens_give_zero_and_no_gradient(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    hidden, weight, labels, g_lp, g_ent = make_inputs(8, 11, 5, torch.float64, ignore=(0, 5))
    lp, ent, gh, _ = run_and_grad(grpo_kernels.token_logprobs, hidden, weight, labels, g_lp, g_ent, chunk_size=3)
    assert lp[[0, 5]].tolist() == [0.0, 0.0] and ent[[0, 5]].tolist() == [0.0, 0.0]
    assert gh[[0, 5]].abs().max().item() == 0.0
    assert gh[[1, 2]].abs().max().item() > 0


def test_without_entropy_returns_none_and_logprob_gradient(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    hidden, weight, labels, g_lp, g_ent = make_inputs(9, 13, 6, torch.float64)
    got = run_and_grad(grpo_kernels.token_logprobs, hidden, weight, labels, g_lp, g_ent, with_entropy=False,
                       chunk_size=4)
    want = naive64(hidden, weight, labels, g_lp, g_ent, with_entropy=False)
    assert got[1] is None
    for name, i in (("logprobs", 0), ("grad_hidden", 2), ("grad_weight", 3)):
        assert_close(got[i], want[i], torch.float64, name)


def test_frozen_weight_gets_no_gradient(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    hidden, weight, labels, _, _ = make_inputs(4, 5, 3, torch.float64)
    weight = weight.detach()
    lp, ent = grpo_kernels.token_logprobs(hidden, weight, labels)
    (gh,) = torch.autograd.grad((lp + ent).sum(), hidden)
    assert gh.shape == hidden.shape and weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_low_precision_matches_float64(dtype, monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    hidden, weight, labels, g_lp, g_ent = make_inputs(37, 101, 24, dtype)
    got = run_and_grad(grpo_kernels.token_logprobs, hidden, weight, labels, g_lp, g_ent, chunk_size=16)
    want = naive64(hidden, weight, labels, g_lp, g_ent)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    assert_close(got[0], want[0], dtype, "logprobs")
    assert_close(got[1], want[1], dtype, "entropy")
    assert_grad_close(got[2], want[2], dtype, "grad_hidden")
    assert_grad_close(got[3], want[3], dtype, "grad_weight")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(hidden=torch.zeros(2, 3, 4)), "hidden must be"),
        (dict(weight=torch.zeros(5, 4)), "weight must be"),
        (dict(labels=torch.zeros(3, dtype=torch.long)), "labels must be"),
        (dict(labels=torch.zeros(2)), "labels must be int64"),
        (dict(labels=torch.tensor([0, 7])), r"labels must lie in \[0, 7\)"),
        (dict(labels=torch.tensor([0, -1])), "labels must lie"),
        (dict(weight=torch.zeros(7, 3, dtype=torch.float64)), "share a floating dtype"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(chunk_size=0), "chunk_size must be"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(hidden=torch.zeros(2, 3), weight=torch.zeros(7, 3), labels=torch.tensor([1, IGNORE_INDEX]))
    args.update(kwargs)
    extra = {k: args.pop(k) for k in ("temperature", "chunk_size") if k in args}
    with pytest.raises(ValueError, match=match):
        grpo_kernels.token_logprobs(args["hidden"], args["weight"], args["labels"], **extra)


test_triton_in_fresh_process = fresh_process_test(__file__)


# ---- Triton (compiled on CUDA, interpreted on CPU) ----


TRITON_CASES = [
    # (N, V, H, dtype, temperature, chunk_size)
    (37, 101, 24, torch.float32, 1.0, None),
    (37, 101, 24, torch.float32, 0.6, 8),
    (21, 67, 40, torch.bfloat16, 1.0, 16),
    (1, 5, 3, torch.float32, 1.0, None),
    (9, 600, 16, torch.float32, 1.0, 1),  # the backward walks three vocabulary chunks (256, 256, 88)
]
if ON_GPU:
    TRITON_CASES += [
        (1000, 5003, 256, torch.bfloat16, 1.0, 300),
        (777, 32000, 512, torch.float32, 0.8, None),
        (2048, 50257, 1024, torch.bfloat16, 1.0, None),
    ]


@needs_triton
@pytest.mark.parametrize(("n", "v", "h", "dtype", "temperature", "chunk_size"), TRITON_CASES)
def test_triton_matches_reference(n, v, h, dtype, temperature, chunk_size, monkeypatch):
    require_triton_in_process()
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    hidden, weight, labels, g_lp, g_ent = make_inputs(n, v, h, dtype, device=DEVICE, ignore=(3, n - 1))
    got = run_and_grad(
        grpo_kernels.token_logprobs,
        hidden,
        weight,
        labels,
        g_lp,
        g_ent,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    want = naive64(hidden, weight, labels, g_lp, g_ent, temperature=temperature)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    assert_close(got[0].cpu(), want[0], dtype, "logprobs")
    assert_close(got[1].cpu(), want[1], dtype, "entropy")
    assert_grad_close(got[2].cpu(), want[2], dtype, "grad_hidden")
    assert_grad_close(got[3].cpu(), want[3], dtype, "grad_weight")
    ignored = labels == IGNORE_INDEX
    assert got[0][ignored].abs().max().item() == 0.0 and got[2][ignored].abs().max().item() == 0.0


@needs_triton
def test_triton_without_entropy(monkeypatch):
    require_triton_in_process()
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    hidden, weight, labels, g_lp, g_ent = make_inputs(19, 45, 20, torch.float32, device=DEVICE)
    got = run_and_grad(grpo_kernels.token_logprobs, hidden, weight, labels, g_lp, g_ent, with_entropy=False)
    want = naive64(hidden, weight, labels, g_lp, g_ent, with_entropy=False)
    assert got[1] is None
    assert_close(got[0].cpu(), want[0], torch.float32, "logprobs")
    assert_grad_close(got[2].cpu(), want[2], torch.float32, "grad_hidden")
    assert_grad_close(got[3].cpu(), want[3], torch.float32, "grad_weight")
