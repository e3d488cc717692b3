"""Multi-head latent attention (MLA) decode over the latent KV cache, with absorbed projections.

At decode, DeepSeek-V2 absorbs ``W_uk`` into the query and ``W_uv`` into the output projection, so one query
token per sequence attends directly over the cached latents ``c_kv`` (``d_c`` values per position) and the
shared RoPE keys ``k_rope`` (``d_r``):

``score[b, h, s] = scale * (q_latent[b, h] . c_kv[b, s] + q_rope[b, h] . k_rope[b, s])``,
``out_latent[b, h] = sum_s softmax_s(score[b, h]) c_kv[b, s]``.

The caller applies ``W_uv`` and ``o_proj`` to ``out_latent``. Positions are masked by a bool mask (True
attends) or by per-sequence lengths (positions ``< length`` attend); a sequence with no valid position gets a
zero output. The PyTorch reference is here; the Triton split-KV (flash-decoding) kernel is in
:mod:`grpo_kernels.triton_impl.mla_decode`. Forward only (decode is not trained through).
"""

from __future__ import annotations

import torch

from grpo_kernels.dispatch import KernelOp


def validate_mla_decode_args(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    c_kv: torch.Tensor,
    k_rope: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> None:
    """Raises ValueError naming the bad argument of :func:`mla_decode`."""
    if q_latent.dim() != 3:
        raise ValueError(f"q_latent must be [B, Hq, d_c], got shape {tuple(q_latent.shape)}")
    b, hq, dc = q_latent.shape
    if q_rope.dim() != 3 or q_rope.shape[:2] != (b, hq):
        raise ValueError(f"q_rope must be [B={b}, Hq={hq}, d_r], got shape {tuple(q_rope.shape)}")
    dr = q_rope.shape[2]
    if c_kv.dim() != 3 or c_kv.shape[0] != b or c_kv.shape[2] != dc or c_kv.shape[1] < 1:
        raise ValueError(f"c_kv must be [B={b}, S>=1, d_c={dc}], got shape {tuple(c_kv.shape)}")
    s = c_kv.shape[1]
    if tuple(k_rope.shape) != (b, s, dr):
        raise ValueError(f"k_rope must be [B={b}, S={s}, d_r={dr}], got shape {tuple(k_rope.shape)}")
    dtypes = {q_latent.dtype, q_rope.dtype, c_kv.dtype, k_rope.dtype}
    if len(dtypes) != 1 or not q_latent.is_floating_point():
        raise ValueError(f"q_latent, q_rope, c_kv and k_rope must share a float dtype, got {sorted(map(str, dtypes))}")
    if mask is not None:
        if mask.dtype == torch.bool:
            if tuple(mask.shape) != (b, s):
                raise ValueError(f"a bool mask must be [B={b}, S={s}], got shape {tuple(mask.shape)}")
        elif mask.dtype in (torch.int64, torch.int32):
            if tuple(mask.shape) != (b,) or bool(((mask < 0) | (mask > s)).any()):
                raise ValueError(f"lengths (an int mask) must be [B={b}] with values in [0, {s}]")
        else:
            raise ValueError(f"mask must be a bool [B, S] mask or int [B] lengths, got {mask.dtype}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")


def valid_positions(mask: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """The bool ``[B, S]`` attend-mask for a bool mask, int lengths, or ``None`` (all positions)."""
    if mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if mask.dtype == torch.bool:
        return mask
    return torch.arange(seq, device=device)[None, :] < mask[:, None]


def torch_mla_decode(
    q_latent: torch.Tensor,  # [B, Hq, d_c]
    q_rope: torch.Tensor,  # [B, Hq, d_r]
    c_kv: torch.Tensor,  # [B, S, d_c]
    k_rope: torch.Tensor,  # [B, S, d_r]
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """PyTorch reference: batched matmuls in the input dtype, the softmax in fp32 (float64 for float64)."""
    b, _, _ = q_latent.shape
    s = c_kv.shape[1]
    acc = torch.promote_types(q_latent.dtype, torch.float32)
    scores = torch.bmm(q_latent, c_kv.transpose(1, 2)).to(acc)  # [B, Hq, S]
    scores = (scores + torch.bmm(q_rope, k_rope.transpose(1, 2)).to(acc)) * scale
    valid = valid_positions(mask, b, s, q_latent.device)  # [B, S]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [B, Hq, S]
    probs = torch.where(valid.any(-1)[:, None, None], probs, 0.0)  # no valid position: zero output
    return torch.bmm(probs.to(c_kv.dtype), c_kv)  # [B, Hq, d_c]


_OP = KernelOp("mla_decode", torch_mla_decode, "grpo_kernels.triton_impl.mla_decode:triton_mla_decode")


def mla_decode(
    q_latent: torch.Tensor,  # [B, Hq, d_c]
    q_rope: torch.Tensor,  # [B, Hq, d_r]
    c_kv: torch.Tensor,  # [B, S, d_c]
    k_rope: torch.Tensor,  # [B, S, d_r]
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One decode step of MLA attention over the latent cache (absorbed ``W_uk``; ``W_uv`` left to the caller).

    Args:
        q_latent: Queries with ``W_uk`` absorbed (``q_nope @ W_uk`` per head). ``[B, Hq, d_c]``
        q_rope: The RoPE part of the queries. ``[B, Hq, d_r]``
        c_kv: Cached compressed latents (after their RMSNorm); any strides with a contiguous last dim are
            read in place, e.g. a ``[:, :S]`` view of a preallocated cache. ``[B, S, d_c]``
        k_rope: Cached shared RoPE keys. ``[B, S, d_r]``
        mask: ``None`` (attend everywhere), a bool ``[B, S]`` mask (True attends), or int ``[B]`` lengths
            (positions ``< length`` attend).
        scale: Score scale, ``1 / sqrt(d_h + d_h^R)`` in DeepSeek-V2 (times any YaRN factor).

    Returns:
        ``out_latent [B, Hq, d_c]`` in the input dtype: the softmax-weighted sum of ``c_kv``; zero for a
        sequence with no valid position.

    Raises:
        ValueError: on a bad shape, dtype, mask/lengths or scale.
    """
    validate_mla_decode_args(q_latent, q_rope, c_kv, k_rope, mask, scale)
    return _OP(q_latent.device, q_latent, q_rope, c_kv, k_rope, mask, float(scale))
