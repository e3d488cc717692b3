"""Token sampling: temperature, top-k and top-p filtering, and the log-probs the trainer needs."""

from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Masks logits outside the top-k set and outside the top-p nucleus with ``-inf``.

    Args:
        logits: ``[B, V]`` (already divided by the temperature).
        top_k: Keep the ``k`` largest logits per row; ``0`` or ``-1`` keeps all.
        top_p: Keep the smallest set of tokens whose probability mass reaches ``top_p``; ``1.0`` keeps all.
            The most likely token is always kept.

    Returns:
        ``[B, V]`` filtered logits.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already >= p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    banned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples one token per row and returns it with its log-prob.

    Args:
        logits: ``[B, V]`` raw next-token logits.
        temperature: ``0`` selects the argmax (greedy).
        top_k: See :func:`filter_logits`.
        top_p: See :func:`filter_logits`.
        generator: Random generator for reproducible sampling.
        banned: Token ids that may not be sampled (e.g. stop tokens before ``min_tokens``); like top-k/top-p
            filtering, this changes what is sampled, not the returned log-probs.

    Returns:
        ``(tokens [B] long, logprobs [B] float32)``; log-probs are of ``softmax(logits / T)`` (``T = 1`` when
        greedy) before filtering.
    """
    logits = logits.float()
    allowed = logits if banned is None else logits.index_fill(-1, banned, float("-inf"))
    if temperature == 0.0:
        tokens = allowed.argmax(dim=-1)
        scaled = logits
    else:
        scaled = logits / temperature
        filtered = filter_logits(allowed / temperature, top_k, top_p)
        probs = filtered.softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    logprobs = scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
