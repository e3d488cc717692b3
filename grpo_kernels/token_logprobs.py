"""Token log-probs and entropy from hidden states and the LM head, without the full ``[N, V]`` logits.

For each token ``n`` with logits ``z = hidden[n] @ weight.T / temperature`` (``[V]``):

* ``logprob[n] = z[label] - logsumexp(z)``;
* ``entropy[n] = logsumexp(z) - sum_v softmax(z)_v * z_v`` (the entropy of ``softmax(z)``).

Gradients, with ``p = softmax(z)``, ``lse = logsumexp(z)`` and ``H`` the entropy:
``d logprob / dz = onehot(label) - p`` and ``d H / dz = -p * (z - lse + H)``; the chain through
``z = h W^T / T`` gives ``grad_hidden = grad_z @ W / T`` and ``grad_weight = grad_z^T @ h / T``.

Tokens labelled ``IGNORE_INDEX`` (-100) get logprob 0 and entropy 0 and pass no gradient.

Two implementations share :func:`token_logprobs`, picked by :mod:`grpo_kernels.dispatch`:

* the PyTorch reference here, chunked over tokens by a memory-saving ``autograd.Function`` (the forward keeps
  only the per-token log-sum-exp and entropy; the backward recomputes each chunk's logits);
* the Triton kernels in :mod:`grpo_kernels.triton_impl.token_logprobs` (a fused matmul + online log-sum-exp over
  vocabulary tiles; the backward recomputes logits tiles the same way).

:func:`naive_token_logprobs` materialises all logits at once; it is the textbook definition the tests hold
both implementations to.
"""

from __future__ import annotations

import torch

from grpo_kernels.dispatch import KernelOp

IGNORE_INDEX = -100
# Chunks hold about this many fp32 logits ([chunk, V]); the backward holds a few such buffers at once.
CHUNK_ELEMENTS = 1 << 25


def default_chunk_size(num_tokens: int, vocab: int) -> int:
    """Tokens per chunk so that a chunk's ``[chunk, V]`` fp32 logits take about 128 MiB."""
    return max(1, min(num_tokens, CHUNK_ELEMENTS // max(vocab, 1)))


def validate_token_logprobs_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    chunk_size: int | None,
) -> None:
    """Checks shapes, dtypes and values of :func:`token_logprobs` arguments.

    Raises:
        ValueError: naming the offending argument and what was expected.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be [V, H] with H={hidden.shape[1]}, got shape {tuple(weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels must be [N] with N={hidden.shape[0]}, got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 or int32, got {labels.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a floating dtype, got {hidden.dtype}, {weight.dtype}")
    if hidden.device != weight.device or hidden.device != labels.device:
        raise ValueError(
            f"hidden, weight and labels must be on one device, got {hidden.device}, {weight.device}, {labels.device}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    vocab = weight.shape[0]
    bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= vocab)
    if labels.numel() and bool(bad.any()):
        raise ValueError(f"labels must lie in [0, {vocab}) or equal {IGNORE_INDEX}")


def naive_token_logprobs(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [N]
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The textbook definition: materialises all ``[N, V]`` logits; ordinary autograd.

    Returns:
        ``(logprobs [N], entropy [N] or None)`` in float32 (float64 for float64 inputs).
    """
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden @ weight.T).to(out_dtype) / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)  # [N, V]
    valid = labels != IGNORE_INDEX  # [N]
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logprobs = logp_all.gather(1, safe[:, None]).squeeze(1) * valid  # [N]
    if not with_entropy:
        return logprobs, None
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid  # [N]
    return logprobs, entropy


def _chunk_stats(
    hidden: torch.Tensor,  # [c, H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [c]
    temperature: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's scaled logits and their statistics.

    Returns:
        ``(z [c, V], lse [c], label_logit [c], mean_z [c])`` with ``mean_z = sum_v softmax(z)_v z_v``.
    """
    z = (hidden @ weight.T).to(out_dtype) / temperature  # [c, V]
    lse = torch.logsumexp(z, dim=-1)  # [c]
    safe = labels.clamp(min=0).long()
    label_logit = z.gather(1, safe[:, None]).squeeze(1)  # [c]
    mean_z = (torch.softmax(z, dim=-1) * z).sum(-1)  # [c]
    return z, lse, label_logit, mean_z


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Chunked reference: the forward keeps ``lse`` and entropy per token, the backward recomputes logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, with_entropy):
        out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX  # [N]
        logprobs = torch.zeros(n, dtype=out_dtype, device=hidden.device)
        lse = torch.zeros(n, dtype=out_dtype, device=hidden.device)
        entropy = torch.zeros(n, dtype=out_dtype, device=hidden.device)
        for start in range(0, n, chunk_size):
            sl = slice(start, start + chunk_size)
            _, lse_c, label_c, mean_z = _chunk_stats(hidden[sl], weight, labels[sl], temperature, out_dtype)
            lse[sl] = lse_c
            logprobs[sl] = (label_c - lse_c) * valid[sl]
            entropy[sl] = (lse_c - mean_z) * valid[sl]
        ctx.save_for_backward(hidden, weight, labels, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy = temperature, chunk_size, with_entropy
        ctx.mark_non_differentiable(labels)
        return logprobs, entropy if with_entropy else None

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, labels, lse, entropy = ctx.saved_tensors
        temperature, chunk = ctx.temperature, ctx.chunk_size
        valid = (labels != IGNORE_INDEX).to(lse.dtype)  # [N]
        g_lp = grad_logprobs.to(lse.dtype) * valid  # [N]
        g_h = grad_entropy.to(lse.dtype) * valid if ctx.with_entropy and grad_entropy is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # Accumulate the weight gradient in fp32 across chunks (one rounding per chunk, none compounding).
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            z = (hidden[sl] @ weight.T).to(lse.dtype) / temperature  # [c, V]
            p = torch.exp(z - lse[sl, None])  # [c, V]
            grad_z = -p * g_lp[sl, None]  # [c, V]
            rows = torch.arange(z.shape[0], device=z.device)
            grad_z[rows, labels[sl].clamp(min=0).long()] += g_lp[sl]
            if g_h is not None:
                grad_z -= g_h[sl, None] * p * (z - lse[sl, None] + entropy[sl, None])
            grad_z = (grad_z / temperature).to(hidden.dtype)  # [c, V]
            if need_h:
                grad_hidden[sl] = grad_z @ weight
            if need_w:
                grad_weight += (grad_z.T @ hidden[sl]).to(acc_dtype)
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def torch_token_logprobs(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [N]
    temperature: float,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PyTorch reference, chunked over tokens; arguments already validated."""
    logprobs, entropy = _ChunkedTokenLogprobs.apply(hidden, weight, labels, temperature, chunk_size, with_entropy)
    return logprobs, entropy


_OP = KernelOp("token_logprobs", torch_token_logprobs, "grpo_kernels.triton_impl.token_logprobs:triton_token_logprobs")


def token_logprobs(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    labels: torch.Tensor,  # [N]
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs of ``labels`` (and the softmax entropy) under ``softmax(hidden @ weight.T / T)``.

    Never materialises the ``[N, V]`` logits at once; differentiable in ``hidden`` and ``weight``.

    Args:
        hidden: Final hidden states, one row per token. ``[N, H]``
        weight: The LM head (output embedding). ``[V, H]``, same dtype as ``hidden``.
        labels: Target token ids in ``[0, V)``, or -100 to ignore a token. ``[N]`` int64/int32.
        temperature: Logits are divided by it (sampling temperature), > 0.
        chunk_size: Tokens per chunk (the PyTorch path, and the Triton backward); ``None`` picks one so that
            a chunk's logits take about 128 MiB.
        with_entropy: Also return the entropy of each token's distribution.

    Returns:
        ``(logprobs, entropy)``: float32 ``[N]`` each (float64 for float64 inputs); ``entropy`` is ``None``
        when ``with_entropy`` is false. Ignored tokens get 0 in both.

    Raises:
        ValueError: on a bad shape, dtype, device, label, temperature or chunk size.
    """
    validate_token_logprobs_args(hidden, weight, labels, temperature, chunk_size)
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    return _OP(hidden.device, hidden, weight, labels, float(temperature), chunk, with_entropy)
