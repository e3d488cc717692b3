"""Triton MLA decode: split-KV (flash-decoding) attention over the latent cache.

Kernel 1, program ``(b, head block, split)``: the head block's absorbed queries ``[BLOCK_H, d_c]`` and RoPE
queries stay in registers while the program walks its slice of the sequence in ``BLOCK_S`` tiles, scoring
``q_latent . c_kv + q_rope . k_rope`` with ``tl.dot`` and keeping an online softmax (running max, running
sum, running ``sum p c_kv``); it writes the normalised partial output and its log-sum-exp. All heads of a
sequence share the one latent cache, so each ``c_kv`` tile is read once per head block (MQA-like).
Kernel 2, program ``(b, head)``: rescales the splits' partial outputs by ``exp(lse_split - lse)`` and sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.dispatch import check_triton_device, interpreter_enabled
from grpo_kernels.mla_decode import torch_mla_decode

LOG2E = 1.4426950408889634


def _split_configs() -> list[triton.Config]:
    if interpreter_enabled():  # the interpreter runs every config it is given: one small tile
        return [triton.Config({"BLOCK_S": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_S": bs}, num_warps=w, num_stages=st)
        for bs, w, st in ((32, 4, 2), (32, 4, 4), (64, 4, 3), (64, 8, 3))
    ]


@triton.jit
def _qk_scores(q, qr, c, kr, IEEE: tl.constexpr):
    """``q c^T + qr kr^T``: the scores of a head block against a block of cached positions. ``[BLOCK_H, BLOCK_S]``"""
    if IEEE:
        scores = tl.dot(q, tl.trans(c), input_precision="ieee")
        return tl.dot(qr, tl.trans(kr), scores, input_precision="ieee")
    return tl.dot(qr, tl.trans(kr), tl.dot(q, tl.trans(c)))


@triton.jit
def _weighted_latents(p, c, acc, IEEE: tl.constexpr):
    """``acc + p c``: the attention-weighted latents of a block added to the running sum. ``[BLOCK_H, BLOCK_C]``"""
    if IEEE:
        return tl.dot(p, c.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(p.to(c.dtype), c, acc)


@triton.autotune(configs=_split_configs(), key=["DC", "DR", "BLOCK_H"])
@triton.jit
def _mla_split_kernel(
    q_ptr, qr_ptr, c_ptr, kr_ptr, mask_ptr, len_ptr, out_ptr, lse_ptr,
    HQ, S, DC, DR, split_len, qk_scale,
    stride_qb, stride_qh, stride_qrb, stride_qrh, stride_cb, stride_cs, stride_krb, stride_krs, stride_mb,
    MASK_KIND: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Partial attention of one (sequence, head block, split). ``MASK_KIND``: 0 none, 1 bool mask, 2 lengths.

    Writes ``out[b, h, split] = sum p c / sum p`` (``[d_c]``) and ``lse[b, h, split]`` in log2 units.
    """
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    h_mask = heads < HQ
    dcs = tl.arange(0, BLOCK_C)
    drs = tl.arange(0, BLOCK_R)
    c_mask = dcs < DC
    r_mask = drs < DR
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dcs[None, :],
                mask=h_mask[:, None] & c_mask[None, :], other=0.0)  # fmt: skip
    qr = tl.load(qr_ptr + b * stride_qrb + heads[:, None] * stride_qrh + drs[None, :],
                 mask=h_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
        qr = qr.to(tl.float32)

    lo = split * split_len
    hi = tl.minimum(lo + split_len, S)
    if MASK_KIND == 2:
        hi = tl.minimum(hi, tl.load(len_ptr + b))
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        pos = s0 + tl.arange(0, BLOCK_S)
        p_mask = pos < hi
        c = tl.load(c_ptr + b * stride_cb + pos[:, None] * stride_cs + dcs[None, :],
                    mask=p_mask[:, None] & c_mask[None, :], other=0.0)  # fmt: skip
        kr = tl.load(kr_ptr + b * stride_krb + pos[:, None] * stride_krs + drs[None, :],
                     mask=p_mask[:, None] & r_mask[None, :], other=0.0)  # fmt: skip
        if MASK_KIND == 1:
            p_mask = p_mask & (tl.load(mask_ptr + b * stride_mb + pos, mask=p_mask, other=0) != 0)
        if UPCAST:
            c = c.to(tl.float32)
            kr = kr.to(tl.float32)
        scores = _qk_scores(q, qr, c, kr, IEEE or UPCAST)
        scores = tl.where(p_mask[None, :], scores * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_S], log2 units
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep exp2 finite
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = _weighted_latents(p, c, acc * alpha[:, None], IEEE or UPCAST)
        m = m_new
    has = l > 0
    out = tl.where(has[:, None], acc / tl.where(has, l, 1.0)[:, None], 0.0)
    row = (b * HQ + heads) * tl.num_programs(2) + split  # [B, HQ, splits] flattened
    tl.store(out_ptr + row[:, None] * DC + dcs[None, :], out, mask=h_mask[:, None] & c_mask[None, :])
    tl.store(lse_ptr + row, tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf")), mask=h_mask)


@triton.jit
def _mla_combine_kernel(part_ptr, lse_ptr, out_ptr, DC, NUM_SPLITS, stride_ob, stride_oh, HQ,
                        BLOCK_C: tl.constexpr, BLOCK_SPLITS: tl.constexpr):  # fmt: skip
    """``out[b, h] = sum_split 2^(lse_split - lse) part[b, h, split]``; zero when no split saw a position."""
    bh = tl.program_id(0)
    splits = tl.arange(0, BLOCK_SPLITS)
    s_mask = splits < NUM_SPLITS
    lse = tl.load(lse_ptr + bh * NUM_SPLITS + splits, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # [BLOCK_SPLITS], 0 for empty splits
    total = tl.sum(w, axis=0)
    w = w / tl.where(total > 0, total, 1.0)
    dcs = tl.arange(0, BLOCK_C)
    c_mask = dcs < DC
    part = tl.load(part_ptr + (bh * NUM_SPLITS + splits)[:, None] * DC + dcs[None, :],
                   mask=s_mask[:, None] & c_mask[None, :], other=0.0)  # fmt: skip
    out = tl.sum(part * w[:, None], axis=0)
    b = bh // HQ
    h = bh % HQ
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dcs, out.to(out_ptr.dtype.element_ty), mask=c_mask)


SPLIT_ALIGN = 64  # split lengths are multiples of every config's BLOCK_S


def _launch_shape(b: int, hq: int, s: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK_H, split_len)``: enough (sequence, head block, split) programs to fill the GPU."""
    block_h = max(16, min(64, triton.next_power_of_2(hq)))
    if interpreter_enabled():  # several splits so that the combine is exercised
        return block_h, max(16, triton.cdiv(triton.cdiv(s, 3), 16) * 16)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = b * triton.cdiv(hq, block_h)
    splits = max(1, min(triton.cdiv(4 * sms, programs), triton.cdiv(s, 256)))
    return block_h, triton.cdiv(triton.cdiv(s, splits), SPLIT_ALIGN) * SPLIT_ALIGN


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_mla_decode(
    q_latent: torch.Tensor,  # [B, Hq, d_c]
    q_rope: torch.Tensor,  # [B, Hq, d_r]
    c_kv: torch.Tensor,  # [B, S, d_c]
    k_rope: torch.Tensor,  # [B, S, d_r]
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Triton implementation of :func:`grpo_kernels.mla_decode` (arguments already validated; float64 runs the
    PyTorch reference)."""
    if q_latent.dtype == torch.float64:
        return torch_mla_decode(q_latent, q_rope, c_kv, k_rope, mask, scale)
    check_triton_device(q_latent, c_kv)
    q_latent, q_rope, c_kv, k_rope = map(_as_rows, (q_latent, q_rope, c_kv, k_rope))
    b, hq, dc = q_latent.shape
    s, dr = c_kv.shape[1], k_rope.shape[2]
    block_h, split_len = _launch_shape(b, hq, s, q_latent.device)
    splits = triton.cdiv(s, split_len)
    part = torch.empty((b, hq, splits, dc), dtype=torch.float32, device=q_latent.device)
    lse = torch.empty((b, hq, splits), dtype=torch.float32, device=q_latent.device)
    out = torch.empty_like(q_latent)
    mask_kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    bool_mask = mask.contiguous() if mask_kind == 1 else None
    lengths = mask.to(torch.int32) if mask_kind == 2 else None
    dummy = lse  # stands in for the pointer a mask kind does not read
    _mla_split_kernel[(b, triton.cdiv(hq, block_h), splits)](
        q_latent, q_rope, c_kv, k_rope,
        bool_mask.view(torch.uint8) if bool_mask is not None else dummy,
        lengths if lengths is not None else dummy,
        part, lse, hq, s, dc, dr, split_len, scale * LOG2E,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        c_kv.stride(0), c_kv.stride(1), k_rope.stride(0), k_rope.stride(1),
        bool_mask.stride(0) if bool_mask is not None else 0,
        MASK_KIND=mask_kind, IEEE=q_latent.dtype == torch.float32, UPCAST=interpreter_enabled(),
        BLOCK_H=block_h, BLOCK_C=max(16, triton.next_power_of_2(dc)),
        BLOCK_R=max(16, triton.next_power_of_2(dr)),
    )  # fmt: skip
    _mla_combine_kernel[(b * hq,)](
        part, lse, out, dc, splits, out.stride(0), out.stride(1), hq,
        BLOCK_C=triton.next_power_of_2(dc), BLOCK_SPLITS=triton.next_power_of_2(splits),
    )  # fmt: skip
    return out
