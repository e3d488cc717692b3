"""Triton token log-probs: a fused LM-head matmul + online log-sum-exp (+ entropy) over vocabulary tiles.

Forward: program ``(token block, vocabulary split)`` computes logits tiles ``h @ W^T / T`` with ``tl.dot``
and folds them into a running max ``m``, a running sum ``s = sum exp(z - m)``, the softmax-weighted logit sum
``t = sum exp(z - m) z`` and the label's logit; the splits (flash-decoding style, to fill the GPU when ``N``
is small) are combined in PyTorch over ``[S, N]`` partials. No ``[N, V]`` tensor is ever written.

Backward: the vocabulary is cut into chunks of about ``chunk_size * V`` logits ``[N, Vc]``; a kernel
recomputes each chunk's logits and writes ``grad_z = (g_lp (onehot - p) - g_H p (z - lse + H)) / T`` in the
input dtype, then cuBLAS gives ``grad_weight[chunk] = grad_z^T @ h`` (each weight row written once, no
cross-chunk rounding) and ``grad_hidden += grad_z @ W[chunk]`` (accumulated in fp32).

float64 inputs run the PyTorch reference (the kernels target fp32/bf16/fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from grpo_kernels.dispatch import check_triton_device, interpreter_enabled
from grpo_kernels.token_logprobs import IGNORE_INDEX, torch_token_logprobs


def _configs() -> list[triton.Config]:
    if interpreter_enabled():  # the interpreter runs every config it is given: one small tile
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh}, num_warps=w, num_stages=s)
        for bn, bv, bh, w, s in (
            (128, 128, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (128, 256, 64, 8, 3),
            (64, 64, 64, 4, 4),
        )
    ]


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """``h[rows] @ W[cols]^T * inv_temp`` in fp32, ``-inf`` outside the vocabulary. ``[BLOCK_N, BLOCK_V]``"""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)  # fmt: skip
        w = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None], mask=col_mask[None, :] & k_mask[:, None],
                    other=0.0)  # fmt: skip
        if UPCAST:
            acc = tl.dot(h.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    z = acc * inv_temp
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.autotune(configs=_configs(), key=["H", "V"])
@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, labels_ptr, lse_ptr, mean_z_ptr, label_z_ptr,
    N, V, H, stride_hn, stride_wv, inv_temp, num_splits,
    WITH_ENTROPY: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Partials of a (token block, vocabulary split): ``lse``, ``sum p z``, the label logit. ``[S, N]``"""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n_blocks  # token blocks vary fastest: concurrent programs share weight tiles in L2
    pid_s = pid // num_n_blocks
    num_tiles = tl.cdiv(V, BLOCK_V)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    label_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_H, IEEE, UPCAST)  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])  # 0 outside the vocabulary
        s = s * alpha + tl.sum(e, axis=1)
        if WITH_ENTROPY:
            t = t * alpha + tl.sum(e * tl.where(col_mask[None, :], z, 0.0), axis=1)
        label_z += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)
        m = m_new
    has_tiles = s > 0  # an empty split (more splits than tiles) contributes lse = -inf
    lse = tl.where(has_tiles, m + tl.log(s), float("-inf"))
    offs = pid_s * N + rows
    tl.store(lse_ptr + offs, lse, mask=row_mask)
    tl.store(label_z_ptr + offs, label_z, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(mean_z_ptr + offs, tl.where(has_tiles, t / s, 0.0), mask=row_mask)


@triton.autotune(configs=_configs(), key=["H", "V"])
@triton.jit
def _grad_logits_kernel(
    h_ptr, w_ptr, labels_ptr, lse_ptr, entropy_ptr, g_lp_ptr, g_ent_ptr, out_ptr,
    N, V, H, v_lo, v_hi, stride_hn, stride_wv, stride_on, inv_temp,
    WITH_ENTROPY: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """``out[n, v - v_lo] = d loss / d logits[n, v]`` for ``v`` in ``[v_lo, v_hi)``; recomputes the logits."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    pid_n = pid % num_n_blocks
    pid_v = pid // num_n_blocks
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < v_hi
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv, inv_temp,
                     BLOCK_N, BLOCK_V, BLOCK_H, IEEE, UPCAST)  # fmt: skip
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_lp = tl.load(g_lp_ptr + rows, mask=row_mask, other=0.0)  # zero for ignored tokens
    p = tl.exp(z - lse[:, None])  # 0 outside the vocabulary
    grad = tl.where(cols[None, :] == labels[:, None], g_lp[:, None], 0.0) - p * g_lp[:, None]
    if WITH_ENTROPY:
        ent = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows, mask=row_mask, other=0.0)
        shifted = tl.where(col_mask[None, :], z - lse[:, None] + ent[:, None], 0.0)
        grad -= g_ent[:, None] * p * shifted
    grad = grad * inv_temp
    out = out_ptr + rows[:, None] * stride_on + (cols - v_lo)[None, :]
    tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _dot_flags(dtype: torch.dtype) -> dict[str, bool]:
    """fp32 inputs take exact fp32 dots (not TF32). Triton's interpreter mis-multiplies 16-bit ``tl.dot``
    operands, so under the interpreter tiles are upcast to fp32 first (the products are exact either way)."""
    return {"IEEE": dtype == torch.float32, "UPCAST": interpreter_enabled()}


def _num_splits(n: int, v: int, device: torch.device) -> int:
    """Vocabulary splits so that about four programs per SM run even for few tokens."""
    if device.type != "cuda":
        return 2 if v > 64 else 1  # exercise the split combine in the interpreter too
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    n_blocks = triton.cdiv(n, 128)
    return max(1, min(64, triton.cdiv(4 * sms, n_blocks), triton.cdiv(v, 128)))


def _forward(hidden, weight, labels, temperature, with_entropy):
    n, h = hidden.shape
    v = weight.shape[0]
    splits = _num_splits(n, v, hidden.device)
    part = torch.empty((3, splits, n), dtype=torch.float32, device=hidden.device)
    lse_p, mean_z_p, label_z_p = part[0], part[1], part[2]

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]) * splits,)

    _forward_kernel[grid](
        hidden, weight, labels, lse_p, mean_z_p, label_z_p,
        n, v, h, hidden.stride(0), weight.stride(0), 1.0 / temperature, splits,
        WITH_ENTROPY=with_entropy, **_dot_flags(hidden.dtype),
    )  # fmt: skip
    lse = torch.logsumexp(lse_p, dim=0)  # [N]
    valid = labels != IGNORE_INDEX  # [N]
    logprobs = torch.where(valid, label_z_p.sum(0) - lse, 0.0)  # [N]
    if not with_entropy:
        return logprobs, lse, None
    mean_z = (torch.exp(lse_p - lse) * mean_z_p).sum(0)  # [N]
    entropy = torch.where(valid, lse - mean_z, 0.0)  # [N]
    return logprobs, lse, entropy


def _backward(hidden, weight, labels, lse, entropy, g_lp, g_ent, temperature, chunk_size, need_h, need_w):
    n, h = hidden.shape
    v = weight.shape[0]
    # Same logits per chunk as the reference's token chunks: chunk_size * V, cut along the vocabulary.
    # Rounded to 256 columns so the buffer's rows stay aligned for cuBLAS (an odd row stride is several times
    # slower there).
    v_chunk = min(v, max(256, chunk_size * v // max(n, 1) // 256 * 256))
    grad_logits = torch.empty((n, v_chunk), dtype=hidden.dtype, device=hidden.device)
    grad_hidden = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_h else None
    grad_weight = torch.empty_like(weight) if need_w else None
    with_entropy = g_ent is not None
    for v_lo in range(0, v, v_chunk):
        v_hi = min(v, v_lo + v_chunk)
        out = grad_logits[:, : v_hi - v_lo]

        def grid(meta, width=v_hi - v_lo):
            return (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(width, meta["BLOCK_V"]),)

        _grad_logits_kernel[grid](
            hidden, weight, labels, lse, entropy if with_entropy else lse, g_lp,
            g_ent if with_entropy else g_lp, out,
            n, v, h, v_lo, v_hi, hidden.stride(0), weight.stride(0), grad_logits.stride(0), 1.0 / temperature,
            WITH_ENTROPY=with_entropy, **_dot_flags(hidden.dtype),
        )  # fmt: skip
        if need_w:
            torch.mm(out.T, hidden, out=grad_weight[v_lo:v_hi])
        if need_h:
            grad_hidden += out @ weight[v_lo:v_hi]
    return grad_hidden.to(hidden.dtype) if need_h else None, grad_weight


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, with_entropy):
        logprobs, lse, entropy = _forward(hidden, weight, labels, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, labels, lse, entropy if with_entropy else lse)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        ctx.mark_non_differentiable(labels)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        valid = labels != IGNORE_INDEX
        g_lp = torch.where(valid, grad_logprobs.float(), 0.0).contiguous()
        g_ent = None
        if ctx.with_entropy and grad_entropy is not None:
            g_ent = torch.where(valid, grad_entropy.float(), 0.0).contiguous()
        grad_hidden, grad_weight = _backward(
            hidden, weight, labels, lse, entropy, g_lp, g_ent, ctx.temperature, ctx.chunk_size,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
        )  # fmt: skip
        return grad_hidden, grad_weight, None, None, None, None


def triton_token_logprobs(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [N]
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton implementation of :func:`grpo_kernels.token_logprobs` (arguments already validated)."""
    if hidden.dtype == torch.float64:
        return torch_token_logprobs(hidden, weight, labels, temperature, chunk_size, with_entropy)
    check_triton_device(hidden, weight)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return _TritonTokenLogprobs.apply(hidden, weight, labels.contiguous(), temperature, chunk_size, with_entropy)
