"""MLA decode: hand-computed values, equivalence with un-absorbed attention, Triton vs the reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import grpo_kernels
from tests.helpers.kernels import (
    DEVICE,
    ON_GPU,
    assert_close,
    fresh_process_test,
    needs_triton,
    require_triton_in_process,
)


def make_inputs(b, hq, s, dc, dr, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = ((b, hq, dc), (b, hq, dr), (b, s, dc), (b, s, dr))
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device) for shape in shapes]


def test_hand_computed():
    # One sequence, one head, two positions, d_c = d_r = 1.
    q, qr = torch.tensor([[[1.0]]]), torch.tensor([[[2.0]]])
    c, kr = torch.tensor([[[3.0], [-1.0]]]), torch.tensor([[[0.5], [1.0]]])
    out = grpo_kernels.mla_decode(q, qr, c, kr, None, 0.5)
    s0, s1 = 0.5 * (3 + 1), 0.5 * (-1 + 2)  # 2.0, 0.5
    p0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    assert out.item() == pytest.approx(p0 * 3 + (1 - p0) * -1, rel=1e-6)
    masked = grpo_kernels.mla_decode(q, qr, c, kr, torch.tensor([[False, True]]), 0.5)
    assert masked.item() == pytest.approx(-1.0)


def test_equals_unabsorbed_attention():
    """Absorbing W_uk into the query and W_uv after attention equals attention over decompressed K and V."""
    b, hq, s, dc, dr, dh = 2, 3, 7, 6, 4, 5
    g = torch.Generator().manual_seed(1)
    f64 = dict(generator=g, dtype=torch.float64)
    q_nope, q_rope = torch.randn(b, hq, dh, **f64), torch.randn(b, hq, dr, **f64)
    c_kv, k_rope = torch.randn(b, s, dc, **f64), torch.randn(b, s, dr, **f64)
    w_uk, w_uv = torch.randn(hq, dh, dc, **f64), torch.randn(hq, dh, dc, **f64)
    lengths = torch.tensor([7, 4])
    scale = 1 / math.sqrt(dh + dr)
    # Un-absorbed: per-head keys [k_C; k_R] and values v_C, standard attention.
    k = torch.cat([torch.einsum("hdc,bsc->bhsd", w_uk, c_kv), k_rope[:, None].expand(b, hq, s, dr)], dim=-1)
    v = torch.einsum("hdc,bsc->bhsd", w_uv, c_kv)
    q = torch.cat([q_nope, q_rope], dim=-1)[:, :, None]  # [B, Hq, 1, dh + dr]
    attend = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, scale=scale)[:, :, 0]  # [B, Hq, dh]
    q_latent = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)
    out_latent = grpo_kernels.mla_decode(q_latent, q_rope, c_kv, k_rope, lengths, scale)
    got = torch.einsum("bhc,hdc->bhd", out_latent, w_uv)
    assert_close(got, want, torch.float64, "absorbed vs un-absorbed")


def test_mask_and_lengths_agree_and_empty_sequence_is_zero():
    q, qr, c, kr = make_inputs(3, 2, 9, 5, 3, torch.float64)
    lengths = torch.tensor([9, 3, 0])
    mask = torch.arange(9)[None, :] < lengths[:, None]
    by_len = grpo_kernels.mla_decode(q, qr, c, kr, lengths, 0.3)
    by_mask = grpo_kernels.mla_decode(q, qr, c, kr, mask, 0.3)
    truncated = grpo_kernels.mla_decode(q[1:2], qr[1:2], c[1:2, :3], kr[1:2, :3], None, 0.3)
    assert_close(by_len, by_mask, torch.float64, "lengths vs mask")
    assert_close(by_len[1:2], truncated, torch.float64, "lengths vs truncated cache")
    assert by_len[2].abs().max().item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(q=torch.zeros(2, 3)), "q_latent must be"),
        (dict(qr=torch.zeros(2, 2, 4)), "q_rope must be"),
        (dict(c=torch.zeros(2, 5, 3)), "c_kv must be"),
        (dict(kr=torch.zeros(2, 4, 4)), "k_rope must be"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "bool mask must be"),
        (dict(mask=torch.tensor([5, 6])), "lengths"),
        (dict(mask=torch.ones(2, 5)), "mask must be a bool"),
        (dict(c=torch.zeros(2, 5, 8, dtype=torch.float64)), "share a float dtype"),
        (dict(scale=0.0), "scale must be > 0"),
    ],
)
def test_bad_input_is_named(kwargs, match):
    args = dict(q=torch.zeros(2, 3, 8), qr=torch.zeros(2, 3, 4), c=torch.zeros(2, 5, 8), kr=torch.zeros(2, 5, 4))
    args.update(mask=None, scale=1.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        grpo_kernels.mla_decode(args["q"], args["qr"], args["c"], args["kr"], args["mask"], args["scale"])


test_triton_in_fresh_process = fresh_process_test(__file__)


# ---- Triton (compiled on CUDA, interpreted on CPU) vs the reference in float64 ----

TRITON_CASES = [
    # (B, Hq, S, d_c, d_r, dtype, mask kind)
    (3, 5, 37, 24, 8, torch.float32, "none"),
    (2, 3, 50, 32, 16, torch.float32, "bool"),
    (3, 2, 45, 24, 8, torch.bfloat16, "lengths"),
]
if ON_GPU:
    TRITON_CASES += [
        (64, 16, 4096, 512, 64, torch.bfloat16, "lengths"),
        (5, 128, 1000, 512, 64, torch.bfloat16, "bool"),
        (7, 20, 333, 96, 32, torch.float32, "lengths"),
    ]


def make_mask(kind, b, s, seed=3):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    lengths[0] = s
    if b > 2:
        lengths[-1] = 0  # an empty sequence
    if kind == "lengths":
        return lengths
    mask = torch.rand(b, s, generator=g) < 0.7
    return mask & (torch.arange(s)[None, :] < lengths[:, None])


@needs_triton
@pytest.mark.parametrize(("b", "hq", "s", "dc", "dr", "dtype", "kind"), TRITON_CASES)
def test_triton_matches_reference(b, hq, s, dc, dr, dtype, kind, monkeypatch):
    require_triton_in_process()
    q, qr, c, kr = make_inputs(b, hq, s, dc, dr, dtype, device=DEVICE)
    mask = make_mask(kind, b, s)
    scale = 1 / math.sqrt(dc // 4 + dr)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    got = grpo_kernels.mla_decode(q, qr, c, kr, None if mask is None else mask.to(DEVICE), scale)
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    want = grpo_kernels.mla_decode(*(x.double().cpu() for x in (q, qr, c, kr)), mask, scale)
    assert got.dtype == dtype and got.shape == (b, hq, dc)
    assert_close(got.cpu(), want, dtype, "mla decode")


@needs_triton
def test_triton_reads_a_strided_cache_in_place(monkeypatch):
    require_triton_in_process()
    q, qr, c_full, kr_full = make_inputs(2, 3, 40, 16, 8, torch.float32, device=DEVICE)
    c, kr = c_full[:, :29], kr_full[:, :29]  # views of a longer preallocated cache
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    got = grpo_kernels.mla_decode(q, qr, c, kr, None, 0.2)
    monkeypatch.setenv("KERNELS_BACKEND", "torch")
    want = grpo_kernels.mla_decode(q.double(), qr.double(), c.double(), kr.double(), None, 0.2)
    assert_close(got.cpu(), want.cpu(), torch.float32, "strided cache")
