"""Triton MoE: row gather/combine kernels for (un)permutation and a grouped GEMM for the expert MLPs.

* Permutation: the sort itself is ``torch.argsort``; the kernels move rows (``_gather_rows``), mix each
  token's K rows with its routing weights in fp32 (``_combine_rows``, also the permutation's backward with
  unit weights), and in the backward scatter ``w * grad`` back to the rows while reducing ``grad_w`` (one
  program per token, so no atomics).
* Grouped GEMM: one launch covers all experts. Row tile ``j`` of the launch finds its expert by walking the
  per-expert tile counts (E scalar loads, no host sync: the grid is the bound ``cdiv(M, BLOCK_M) + E`` and
  surplus programs exit). The weight of the tile's expert is read through strides, so the same kernel computes
  ``x @ W_e^T`` and ``g @ W_e``. Weight gradients use a second kernel: program ``(e, tile)`` reduces
  ``A_e^T @ B_e`` over expert e's rows, written once (no atomics).
* SwiGLU runs as an element-wise kernel between the two GEMMs; its backward recomputes it from ``gate|up``.

float64 inputs run the PyTorch references (the kernels target fp32/bf16/fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.dispatch import check_triton_device, interpreter_enabled
from grpo_kernels.moe import torch_grouped_mlp, torch_moe_permute, torch_moe_unpermute

ROW_BLOCK = 1024  # columns per program of the row-moving kernels


def _dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """Exact fp32 dots for fp32 (not TF32); fp32 upcast under the interpreter (its 16-bit dot is wrong)."""
    return {"IEEE": dtype == torch.float32, "UPCAST": interpreter_enabled()}


def _gemm_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (128, 128, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 256, 64, 8, 3),
            (64, 64, 64, 4, 4),
        )
    ]


def _wgrad_configs() -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_P": 16, "BLOCK_Q": 32, "BLOCK_M": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_P": bp, "BLOCK_Q": bq, "BLOCK_M": bm}, num_warps=w, num_stages=s)
        for bp, bq, bm, w, s in (
            (128, 128, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 128, 32, 8, 4),
        )
    ]


# ---- row movement ----


@triton.jit
def _gather_rows_kernel(src_ptr, order_ptr, dst_ptr, H, K, stride_src, stride_dst, BLOCK_H: tl.constexpr):
    """``dst[i] = src[order[i] // K]``; grid ``(T*K, cdiv(H, BLOCK_H))``."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    src_row = tl.load(order_ptr + i) // K
    x = tl.load(src_ptr + src_row * stride_src + cols, mask=mask)
    tl.store(dst_ptr + i.to(tl.int64) * stride_dst + cols, x, mask=mask)


@triton.jit
def _combine_rows_kernel(
    src_ptr, inverse_ptr, w_ptr, dst_ptr, H, K, stride_src, stride_dst,
    HAS_WEIGHTS: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """``dst[t] = sum_k w[t, k] * src[inverse[t*K + k]]`` (``w = 1`` without weights), fp32 accumulation."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in range(K):
        j = tl.load(inverse_ptr + t * K + k)
        row = tl.load(src_ptr + j * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            row = row * tl.load(w_ptr + t * K + k).to(tl.float32)
        acc += row
    tl.store(dst_ptr + t.to(tl.int64) * stride_dst + cols, acc.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _unpermute_backward_kernel(
    grad_out_ptr, rows_ptr, inverse_ptr, w_ptr, grad_rows_ptr, grad_w_ptr,
    H, K, stride_g, stride_rows, stride_grad_rows,
    NEED_W_GRAD: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Per token t and slot k, with ``j = inverse[t*K + k]``: ``grad_rows[j] = w[t, k] * grad_out[t]`` and
    ``grad_w[t, k] = <grad_out[t], rows[j]>``."""
    t = tl.program_id(0)
    for k in range(K):
        j = tl.load(inverse_ptr + t * K + k)
        w = tl.load(w_ptr + t * K + k).to(tl.float32)
        dot = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            mask = cols < H
            g = tl.load(grad_out_ptr + t * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
            out = grad_rows_ptr + j * stride_grad_rows + cols
            tl.store(out, (w * g).to(grad_rows_ptr.dtype.element_ty), mask=mask)
            if NEED_W_GRAD:
                dot += g * tl.load(rows_ptr + j * stride_rows + cols, mask=mask, other=0.0).to(tl.float32)
        if NEED_W_GRAD:
            tl.store(grad_w_ptr + t * K + k, tl.sum(dot, axis=0))


def _gather_rows(src: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    dst = torch.empty((order.shape[0], src.shape[1]), dtype=src.dtype, device=src.device)
    if dst.numel():
        grid = (order.shape[0], triton.cdiv(src.shape[1], ROW_BLOCK))
        _gather_rows_kernel[grid](src, order, dst, src.shape[1], k, src.stride(0), dst.stride(0), ROW_BLOCK)
    return dst


def _combine_rows(src: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None, t: int, k: int):
    dst = torch.empty((t, src.shape[1]), dtype=src.dtype, device=src.device)
    if dst.numel():
        grid = (t, triton.cdiv(src.shape[1], ROW_BLOCK))
        w = weights if weights is not None else inverse  # unused pointer when HAS_WEIGHTS is false
        _combine_rows_kernel[grid](
            src, inverse, w, dst, src.shape[1], k, src.stride(0), dst.stride(0),
            HAS_WEIGHTS=weights is not None, BLOCK_H=ROW_BLOCK,
        )  # fmt: skip
    return dst


def _inverse(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.shape[0], device=order.device, dtype=order.dtype)
    return inverse


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.shape = (hidden.shape[0], k)
        return _gather_rows(hidden, order, k)

    @staticmethod
    def backward(ctx, grad_permuted):
        (inverse,) = ctx.saved_tensors
        t, k = ctx.shape
        return _combine_rows(grad_permuted.contiguous(), inverse, None, t, k), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, routing_weights, inverse):
        t, k = routing_weights.shape
        ctx.save_for_backward(expert_out, routing_weights, inverse)
        return _combine_rows(expert_out, inverse, routing_weights, t, k)

    @staticmethod
    def backward(ctx, grad_out):
        expert_out, routing_weights, inverse = ctx.saved_tensors
        t, k = routing_weights.shape
        grad_out = grad_out.contiguous()
        grad_rows = torch.empty_like(expert_out)
        need_w = ctx.needs_input_grad[1]
        grad_w = torch.empty((t, k), dtype=torch.float32, device=expert_out.device)
        if t and expert_out.shape[1]:
            _unpermute_backward_kernel[(t,)](
                grad_out, expert_out, inverse, routing_weights, grad_rows, grad_w,
                expert_out.shape[1], k, grad_out.stride(0), expert_out.stride(0), grad_rows.stride(0),
                NEED_W_GRAD=need_w, BLOCK_H=ROW_BLOCK,
            )  # fmt: skip
        else:
            grad_rows.zero_()
            grad_w.zero_()
        return grad_rows, grad_w.to(routing_weights.dtype) if need_w else None, None


def triton_moe_permute(hidden: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """Triton implementation of :func:`grpo_kernels.moe_permute` (arguments already validated; float64 runs the
    PyTorch reference, as for every op here)."""
    if hidden.dtype == torch.float64:
        return torch_moe_permute(hidden, expert_ids, num_experts)
    check_triton_device(hidden)
    flat = expert_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)  # [T*K]
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)  # [E]
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    permuted = _Permute.apply(hidden, order, _inverse(order), expert_ids.shape[1])
    return permuted, order, tokens_per_expert


def triton_moe_unpermute(expert_out: torch.Tensor, order: torch.Tensor, routing_weights: torch.Tensor):
    """Triton implementation of :func:`grpo_kernels.moe_unpermute` (arguments already validated)."""
    if expert_out.dtype == torch.float64:
        return torch_moe_unpermute(expert_out, order, routing_weights)
    check_triton_device(expert_out)
    expert_out = expert_out if expert_out.stride(-1) == 1 else expert_out.contiguous()
    return _Unpermute.apply(expert_out, routing_weights.contiguous(), _inverse(order.long()))


# ---- grouped GEMM ----


@triton.jit
def _tile_of_expert(counts_ptr, E, tile, BLOCK_M: tl.constexpr):
    """The expert owning row tile ``tile`` and its rows ``[row_start, row_end)``; ``E`` past the end."""
    expert = E
    row_start = 0
    row_end = 0
    tiles_before = 0
    rows_before = 0
    for e in range(E):
        count = tl.load(counts_ptr + e)
        n_tiles = (count + BLOCK_M - 1) // BLOCK_M
        hit = (tile >= tiles_before) & (tile < tiles_before + n_tiles)
        expert = tl.where(hit, e, expert)
        row_start = tl.where(hit, rows_before + (tile - tiles_before) * BLOCK_M, row_start)
        row_end = tl.where(hit, rows_before + count, row_end)
        tiles_before += n_tiles
        rows_before += count
    return expert, row_start, row_end


@triton.autotune(configs=_gemm_configs(), key=["N", "K"])
@triton.jit
def _grouped_gemm_kernel(
    x_ptr, w_ptr, out_ptr, counts_ptr, E, N, K,
    stride_xm, stride_we, stride_wk, stride_wn, stride_om,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``out[r, n] = sum_k x[r, k] * W_e[k, n]`` for the rows r of expert e; ``W_e`` read through strides."""
    expert, row_start, row_end = _tile_of_expert(counts_ptr, E, tl.program_id(0), BLOCK_M)
    if expert < E:
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            b = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                        mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        out = out_ptr + rows[:, None] * stride_om + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.autotune(configs=_wgrad_configs(), key=["P", "Q"])
@triton.jit
def _grouped_wgrad_kernel(
    a_ptr, b_ptr, dw_ptr, counts_ptr, offsets_ptr, P, Q,
    stride_am, stride_bm, stride_de, stride_dp,
    IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``dw[e] = A_e^T @ B_e`` over expert e's rows (``[P, Q]``); zero for an expert without rows."""
    e = tl.program_id(0)
    num_q = tl.cdiv(Q, BLOCK_Q)
    ps = (tl.program_id(1) // num_q) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = (tl.program_id(1) % num_q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = ps < P
    q_mask = qs < Q
    start = tl.load(offsets_ptr + e)
    count = tl.load(counts_ptr + e)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        local = m0 + tl.arange(0, BLOCK_M)
        m_mask = local < count
        rows = start + local
        a = tl.load(a_ptr + rows[None, :] * stride_am + ps[:, None], mask=p_mask[:, None] & m_mask[None, :],
                    other=0.0)  # fmt: skip
        b = tl.load(b_ptr + rows[:, None] * stride_bm + qs[None, :], mask=m_mask[:, None] & q_mask[None, :],
                    other=0.0)  # fmt: skip
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = dw_ptr + e.to(tl.int64) * stride_de + ps[:, None] * stride_dp + qs[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=p_mask[:, None] & q_mask[None, :])


@triton.jit
def _swiglu_forward_kernel(gu_ptr, a_ptr, I, stride_gu, stride_a, BLOCK: tl.constexpr):
    """``a = silu(gate) * up`` with ``gu[r] = [gate | up]``, in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    a = g * tl.sigmoid(g) * u
    tl.store(a_ptr + row * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(grad_a_ptr, gu_ptr, grad_gu_ptr, I, stride_ga, stride_gu, BLOCK: tl.constexpr):
    """``grad_up = grad_a silu(g)``, ``grad_gate = grad_a u s (1 + g (1 - s))`` with ``s = sigmoid(g)``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    ga = tl.load(grad_a_ptr + row * stride_ga + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    out = grad_gu_ptr + row * stride_gu + cols
    tl.store(out, (ga * u * s * (1 + g * (1 - s))).to(grad_gu_ptr.dtype.element_ty), mask=mask)
    tl.store(out + I, (ga * g * s).to(grad_gu_ptr.dtype.element_ty), mask=mask)


def _grouped_gemm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, transpose_w: bool) -> torch.Tensor:
    """``out_e = x_e @ w[e]^T`` (``transpose_w``) or ``x_e @ w[e]`` for each expert's rows. ``[M, N]``"""
    m, k = x.shape
    n = w.shape[1] if transpose_w else w.shape[2]
    stride_wk, stride_wn = (w.stride(2), w.stride(1)) if transpose_w else (w.stride(1), w.stride(2))
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    e = counts.shape[0]

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) + e, triton.cdiv(n, meta["BLOCK_N"]))

    if m:
        _grouped_gemm_kernel[grid](
            x, w, out, counts, e, n, k, x.stride(0), w.stride(0), stride_wk, stride_wn, out.stride(0),
            **_dot_flags(x.dtype),
        )  # fmt: skip
    return out


def _grouped_wgrad(a: torch.Tensor, b: torch.Tensor, counts, offsets, like: torch.Tensor) -> torch.Tensor:
    """``dw[e] = a_e^T @ b_e`` for each expert's rows. ``[E, P, Q]``"""
    e, p, q = like.shape
    dw = torch.empty_like(like)

    def grid(meta):
        return (e, triton.cdiv(p, meta["BLOCK_P"]) * triton.cdiv(q, meta["BLOCK_Q"]))

    _grouped_wgrad_kernel[grid](
        a, b, dw, counts, offsets, p, q, a.stride(0), b.stride(0), dw.stride(0), dw.stride(1),
        **_dot_flags(a.dtype),
    )  # fmt: skip
    return dw


def _swiglu(gu: torch.Tensor) -> torch.Tensor:
    m, two_i = gu.shape
    a = torch.empty((m, two_i // 2), dtype=gu.dtype, device=gu.device)
    if a.numel():
        grid = (m, triton.cdiv(two_i // 2, ROW_BLOCK))
        _swiglu_forward_kernel[grid](gu, a, two_i // 2, gu.stride(0), a.stride(0), ROW_BLOCK)
    return a


def _swiglu_backward(grad_a: torch.Tensor, gu: torch.Tensor) -> torch.Tensor:
    m, two_i = gu.shape
    grad_gu = torch.empty_like(gu)
    if grad_gu.numel():
        grid = (m, triton.cdiv(two_i // 2, ROW_BLOCK))
        _swiglu_backward_kernel[grid](grad_a, gu, grad_gu, two_i // 2, grad_a.stride(0), gu.stride(0), ROW_BLOCK)
    return grad_gu


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, offsets, w_gate_up, w_down):
        gu = _grouped_gemm(x, w_gate_up, counts, transpose_w=True)  # [M, 2I]
        y = _grouped_gemm(_swiglu(gu), w_down, counts, transpose_w=True)  # [M, H]
        ctx.save_for_backward(x, counts, offsets, w_gate_up, w_down, gu)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, counts, offsets, w_gate_up, w_down, gu = ctx.saved_tensors
        need_x, need_gu, need_down = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_y = grad_y.contiguous()
        grad_down = _grouped_wgrad(grad_y, _swiglu(gu), counts, offsets, w_down) if need_down else None
        grad_gu = _swiglu_backward(_grouped_gemm(grad_y, w_down, counts, transpose_w=False), gu)  # [M, 2I]
        grad_x = _grouped_gemm(grad_gu, w_gate_up, counts, transpose_w=False) if need_x else None
        grad_gate_up = _grouped_wgrad(grad_gu, x, counts, offsets, w_gate_up) if need_gu else None
        return grad_x, None, None, grad_gate_up, grad_down


def triton_grouped_mlp(
    permuted: torch.Tensor, tokens_per_expert: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Triton implementation of :func:`grpo_kernels.grouped_mlp` (arguments already validated; float64 runs the
    PyTorch reference)."""
    if permuted.dtype == torch.float64:
        return torch_grouped_mlp(permuted, tokens_per_expert, w_gate_up, w_down)
    check_triton_device(permuted, w_gate_up, w_down)
    counts = tokens_per_expert.to(torch.int32)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32) - counts  # [E] first row of each expert
    permuted = permuted if permuted.stride(-1) == 1 else permuted.contiguous()
    return _GroupedMLP.apply(permuted, counts, offsets, w_gate_up.contiguous(), w_down.contiguous())
