"""MoE permutation and grouped MLP: hand-computed values, a per-expert loop, Triton vs the references."""

import math

import pytest
import torch

import grpo_kernels
from grpo_kernels.dispatch import triton_available
from grpo_kernels.moe import naive_moe_layer
from tests.helpers.kernels import (
    DEVICE,
    ON_GPU,
    assert_close,
    assert_grad_close,
    fresh_process_test,
    needs_triton,
    require_triton_in_process,
)


def make_moe(t, k, e, h, i, dtype, seed=0, device="cpu", empty_expert=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g, dtype=torch.float64)
    scores = torch.rand(t, e, generator=g, dtype=torch.float64)
    if empty_expert is not None:
        scores[:, empty_expert] = -1.0  # never chosen
    weights, expert_ids = scores.softmax(-1).topk(k, dim=-1)
    w_gate_up = torch.randn(e, 2 * i, h, generator=g, dtype=torch.float64) / h**0.5
    w_down = torch.randn(e, h, i, generator=g, dtype=torch.float64) / i**0.5
    cast = dict(dtype=dtype, device=device)
    return (
        hidden.to(**cast).requires_grad_(),
        expert_ids.to(device),
        weights.to(**cast).requires_grad_(),
        w_gate_up.to(**cast).requires_grad_(),
        w_down.to(**cast).requires_grad_(),
    )


def moe_layer(hidden, expert_ids, weights, w_gate_up, w_down, num_experts):
    permuted, order, counts = grpo_kernels.moe_permute(hidden, expert_ids, num_experts)
    expert_out = grpo_kernels.grouped_mlp(permuted, counts, w_gate_up, w_down)
    return grpo_kernels.moe_unpermute(expert_out, order, weights)


def test_permute_hand_computed():
    hidden = torch.tensor([[1.0], [2.0], [3.0]])
    expert_ids = torch.tensor([[1, 0], [0, 2], [1, 1]])  # flat: 1 0 0 2 1 1
    permuted, order, counts = grpo_kernels.moe_permute(hidden, expert_ids, 4)
    assert order.tolist() == [1, 2, 0, 4, 5, 3]
    assert permuted.squeeze(1).tolist() == [1.0, 2.0, 1.0, 3.0, 3.0, 2.0]
    assert counts.tolist() == [2, 3, 1, 0]


def test_unpermute_hand_computed():
    order = torch.tensor([1, 2, 0, 4, 5, 3])  # row j holds assignment order[j] = t*K + k
    expert_out = torch.tensor([[10.0], [20.0], [30.0], [40.0], [50.0], [60.0]])
    weights = torch.tensor([[0.5, 0.25], [1.0, 2.0], [0.1, 0.2]])
    out = grpo_kernels.moe_unpermute(expert_out, order, weights)
    # token 0: slots 0,1 at rows 2,0 -> 0.5*30 + 0.25*10; token 1: rows 1,5; token 2: rows 3,4
    want = [0.5 * 30 + 0.25 * 10, 1.0 * 20 + 2.0 * 60, 0.1 * 40 + 0.2 * 50]
    assert out.squeeze(1).tolist() == pytest.approx(want)


def test_grouped_mlp_hand_computed():
    # One expert, H=1, I=1: y = w_down * silu(w_gate * x) * (w_up * x)
    x = torch.tensor([[2.0]], dtype=torch.float64)
    out = grpo_kernels.grouped_mlp(x, torch.tensor([1]), torch.tensor([[[0.5], [3.0]]], dtype=torch.float64),
                              torch.tensor([[[-2.0]]], dtype=torch.float64))  # fmt: skip
    silu = 1.0 / (1 + torch.exp(torch.tensor(-1.0, dtype=torch.float64)))
    assert out.item() == pytest.approx(-2.0 * silu.item() * 6.0, abs=1e-12)


def test_naive_layer_hand_computed():
    # H=1, I=1, E=2, K=2: out[t] = sum_k w[t,k] * down_e * silu(gate_e * x) * (up_e * x)
    def mlp(x, gate, up, down):
        return down * x * gate / (1 + math.exp(-gate * x)) * up * x

    hidden = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    expert_ids = torch.tensor([[0, 1], [1, 0]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5]], dtype=torch.float64)
    w_gate_up = torch.tensor([[[1.0], [2.0]], [[-1.0], [3.0]]], dtype=torch.float64)  # [E, 2I, H]
    w_down = torch.tensor([[[0.5]], [[2.0]]], dtype=torch.float64)  # [E, H, I]
    out = naive_moe_layer(hidden, expert_ids, weights, w_gate_up, w_down)
    e0, e1 = (1.0, 2.0, 0.5), (-1.0, 3.0, 2.0)
    want = [0.75 * mlp(1.0, *e0) + 0.25 * mlp(1.0, *e1), 0.5 * mlp(2.0, *e1) + 0.5 * mlp(2.0, *e0)]
    assert out.squeeze(1).tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(("backend", "dtype"), [("torch", torch.float64), ("triton", torch.float32)])
def test_layer_matches_per_expert_loop(backend, dtype, monkeypatch):
    if backend == "triton" and not triton_available():
        pytest.skip("triton is not importable")
    if backend == "triton":
        require_triton_in_process()
    monkeypatch.setenv("KERNELS_BACKEND", backend)
    device = DEVICE if backend == "triton" else "cpu"
    args = make_moe(11, 3, 5, 8, 6, dtype, device=device, empty_expert=2)
    got = moe_layer(*args, num_experts=5)
    args64 = [a.detach().double().cpu().requires_grad_() if a.is_floating_point() else a.cpu() for a in args]
    want = naive_moe_layer(*args64)
    assert_close(got.cpu(), want, dtype, "moe layer")
    grads = torch.autograd.grad(got.sum(), [args[0], args[2], args[3], args[4]])
    want_grads = torch.autograd.grad(want.sum(), [args64[0], args64[2], args64[3], args64[4]])
    for name, a, b in zip(("hidden", "weights", "w_gate_up", "w_down"), grads, want_grads, strict=True):
        assert_grad_close(a.cpu(), b, dtype, f"grad {name}")
    assert grads[3][2].abs().max().item() == 0.0  # the empty expert's weights get a zero gradient


def test_reference_gradcheck(monkeypatch):
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    hidden, expert_ids, weights, w_gu, w_down = make_moe(5, 2, 3, 4, 3, torch.float64)

    def fn(h, w, a, b):
        return moe_layer(h, expert_ids, w, a, b, num_experts=3)

    assert torch.autograd.gradcheck(fn, (hidden, weights, w_gu, w_down))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: grpo_kernels.moe_permute(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long), 0),
            "num_experts",
        ),
        (lambda: grpo_kernels.moe_permute(torch.zeros(3, 2), torch.tensor([[0], [5], [1]]), 4), r"\[0, 4\)"),
        (
            lambda: grpo_kernels.moe_permute(torch.zeros(3, 2), torch.zeros(2, 1, dtype=torch.long), 4),
            "expert_ids",
        ),
        (lambda: grpo_kernels.moe_permute(torch.zeros(3), torch.zeros(3, 1, dtype=torch.long), 4), "hidden"),
        (lambda: grpo_kernels.moe_unpermute(torch.zeros(5, 2), torch.arange(6), torch.ones(3, 2)), "expert_out"),
        (lambda: grpo_kernels.moe_unpermute(torch.zeros(6, 2), torch.arange(5), torch.ones(3, 2)), "order"),
        (
            lambda: grpo_kernels.grouped_mlp(
                torch.zeros(4, 2), torch.tensor([1, 2]), torch.zeros(2, 6, 2), torch.zeros(2, 2, 3)
            ),  # fmt: skip
            "sum to M=4",
        ),
        (
            lambda: grpo_kernels.grouped_mlp(
                torch.zeros(3, 2), torch.tensor([1, 2]), torch.zeros(2, 5, 2), torch.zeros(2, 2, 3)
            ),  # fmt: skip
            "w_gate_up",
        ),
        (
            lambda: grpo_kernels.grouped_mlp(
                torch.zeros(3, 2), torch.tensor([1, 2]), torch.zeros(2, 6, 2), torch.zeros(2, 3, 2)
            ),  # fmt: skip
            "w_down",
        ),
    ],
)
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


test_triton_in_fresh_process = fresh_process_test(__file__)


# ---- Triton (compiled on CUDA, interpreted on CPU) vs the PyTorch references ----

TRITON_CASES = [
    # (T, K, E, H, I, dtype)
    (13, 3, 5, 24, 10, torch.float32),
    (9, 2, 4, 40, 20, torch.bfloat16),
]
if ON_GPU:
    TRITON_CASES += [(1000, 6, 64, 512, 176, torch.bfloat16), (333, 2, 7, 300, 100, torch.float32)]


def grads_of(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, g.to(out.dtype).to(out.device))


@needs_triton
@pytest.mark.parametrize(("t", "k", "e", "h", "i", "dtype"), TRITON_CASES)
def test_triton_permute_unpermute(t, k, e, h, i, dtype, monkeypatch):
    require_triton_in_process()
    hidden, expert_ids, weights, _, _ = make_moe(t, k, e, h, i, dtype, device=DEVICE)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KERNELS_BACKEND", backend)
        permuted, order, counts = grpo_kernels.moe_permute(hidden, expert_ids, e)
        expert_out = permuted * 2 + 1  # something that is not just a copy
        out = grpo_kernels.moe_unpermute(expert_out, order, weights)
        results[backend] = (permuted.detach(), order, counts, out.detach(), *grads_of(out, [hidden, weights]))
    ref, got = results["torch"], results["triton"]
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert_close(got[3].cpu(), ref[3].cpu(), dtype, "unpermuted")
    assert_grad_close(got[4].cpu(), ref[4].cpu(), dtype, "grad hidden")
    assert_grad_close(got[5].cpu(), ref[5].cpu(), dtype, "grad routing weights")


@needs_triton
@pytest.mark.parametrize(("t", "k", "e", "h", "i", "dtype"), TRITON_CASES)
def test_triton_grouped_mlp(t, k, e, h, i, dtype, monkeypatch):
    require_triton_in_process()
    hidden, expert_ids, _, w_gu, w_down = make_moe(t, k, e, h, i, dtype, device=DEVICE, empty_expert=1)
    permuted, _, counts = grpo_kernels.moe_permute(hidden.detach(), expert_ids, e)
    permuted.requires_grad_()
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    out = grpo_kernels.grouped_mlp(permuted, counts, w_gu, w_down)
    got = (out.detach(), *grads_of(out, [permuted, w_gu, w_down]))
    # Reference in float64 from the same input values.
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    ref_inputs = [x.detach().double().cpu().requires_grad_() for x in (permuted, w_gu, w_down)]
    ref_out = grpo_kernels.grouped_mlp(ref_inputs[0], counts.cpu(), ref_inputs[1], ref_inputs[2])
    want = (ref_out.detach(), *grads_of(ref_out, ref_inputs))
    assert got[0].dtype == dtype
    assert_close(got[0].cpu(), want[0], dtype, "grouped mlp")
    for name, a, b in zip(("permuted", "w_gate_up", "w_down"), got[1:], want[1:], strict=True):
        assert_grad_close(a.cpu(), b, dtype, f"grad {name}")
    assert got[2][1].abs().max().item() == 0.0 and got[3][1].abs().max().item() == 0.0
