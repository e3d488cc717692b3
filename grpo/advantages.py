"""Advantage estimators for group-sampled rollouts.

Every prompt is answered ``G`` times and the ``G`` outputs of a prompt sit next to each other, so a flat
batch of ``N = B*G`` rewards reshapes to ``[B, G]``. An estimator turns rewards into advantages in two steps:
a baseline is subtracted, then the centred values are optionally divided by a spread (``scale``).

Estimators (``compute_advantages(name, ...)``):

* ``grpo``: ``A_i = (r_i - mean(r)) / (std(r) + eps)`` over the group, torch's unbiased std (DeepSeekMath,
  outcome supervision). Default ``scale="group"``.
* ``dr_grpo``: ``A_i = r_i - mean(r)`` (Dr.GRPO drops the std division). Default ``scale="none"``.
* ``rloo``: leave-one-out baseline ``A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r))``; needs
  ``G >= 2``. Default ``scale="none"``.
* ``process``: DeepSeekMath process supervision. Each output carries step rewards and the completion-token
  index where each step ends; all step rewards of a group are normalised by the group's mean and unbiased
  std, and the advantage of token ``t`` is the sum of the normalised rewards of the steps ending at or after
  ``t``. Output ``[N, T]``; tokens after the last step get 0.

``scale`` (all estimators): ``"group"`` divides by the group's std (``std + eps``), ``"batch"`` divides by
the std of all centred values in the batch (REINFORCE++-style global normalisation; the centred values
already have zero mean per group, so this is whitening), ``"none"`` keeps the centred values.

Where we depart from the papers:

* A group (or, for ``scale="batch"``, a batch) whose values are all equal gets advantage exactly 0 rather
  than ``0 / (0 + eps)`` computed in floating point, which can be a tiny non-zero number when the mean is
  inexact. ``G = 1`` is such a group for ``grpo``/``dr_grpo``/``process`` (the unbiased std is undefined).
* ``eps`` defaults to ``1e-6`` (the paper does not give one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from model.registry import Registry

ADVANTAGE_ESTIMATORS: Registry[Callable[..., Tensor]] = Registry("advantage estimator")
SCALES = ("group", "batch", "none")

__all__ = ["ADVANTAGE_ESTIMATORS", "SCALES", "compute_advantages"]


def compute_advantages(name: str, rewards: Tensor | Sequence, group_size: int, **kw) -> Tensor:
    """Computes advantages with the estimator registered as ``name``.

    Args:
        name: A registered estimator: ``grpo``, ``dr_grpo``, ``rloo``, ``process`` (see the module docstring).
        rewards: For outcome estimators, ``[B*G]`` rewards with each prompt's ``G`` outputs contiguous (a
            tensor or a sequence of numbers). For ``process``, ``B*G`` step-reward vectors, one per output.
        group_size: ``G``, the number of outputs per prompt.
        **kw: Estimator options: ``eps``, ``scale`` and, for ``process``, ``step_ends`` and ``num_tokens``.

    Returns:
        ``[B*G]`` advantages (``[B*G, T]`` for ``process``), floating point.

    Raises:
        KeyError: for an unknown ``name`` (lists the known ones).
        ValueError: when ``group_size`` does not divide the number of outputs, or an option is invalid.
    """
    return ADVANTAGE_ESTIMATORS.get(name)(rewards, group_size, **kw)


# ----------------------------------------------------------------------------------------------------------
# validation and the shared scaling step
# ----------------------------------------------------------------------------------------------------------
def _check_group_size(group_size: int, n: int, what: str = "rewards") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(
            f"len({what}) ({n}) must be divisible by group_size ({group_size}): the {group_size} outputs of "
            "each prompt are expected to be contiguous"
        )
    return n // group_size


def _as_rewards(rewards: Tensor | Sequence) -> Tensor:
    r = rewards if isinstance(rewards, Tensor) else torch.as_tensor(rewards)
    if r.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(r.shape)}")
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite; got NaN or inf (map 'no opinion' rewards to numbers first)")
    return r


def _check_options(scale: str, eps: float) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


def _safe_std(x: Tensor, dim: int | None = None) -> Tensor:
    """Unbiased std that reads 0 (not NaN) where fewer than two values are given."""
    if (x.numel() if dim is None else x.shape[dim]) < 2:
        return torch.zeros_like(x.sum() if dim is None else x.sum(dim))
    return x.std() if dim is None else x.std(dim=dim)


def _scale_groups(centred: Tensor, grouped: Tensor, scale: str, eps: float) -> Tensor:
    """Divides centred values by a spread and zeroes degenerate groups.

    Args:
        centred: ``[B, G]`` baseline-subtracted rewards.
        grouped: ``[B, G]`` raw rewards, used for the group std and to detect zero-spread groups.
        scale: ``"group" | "batch" | "none"``.
        eps: Added to the std.

    Returns:
        ``[B, G]`` advantages; exactly 0 in groups whose rewards are all equal.
    """
    flat = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # [B, 1]
    if scale == "group":
        centred = centred / (_safe_std(grouped, dim=1).unsqueeze(1) + eps)
    elif scale == "batch" and not bool(flat.all()):
        centred = centred / (_safe_std(centred) + eps)
    return centred.masked_fill(flat, 0.0)


# ----------------------------------------------------------------------------------------------------------
# outcome supervision
# ----------------------------------------------------------------------------------------------------------
def _group_mean_baseline(rewards, group_size: int, *, scale: str, eps: float) -> Tensor:
    _check_options(scale, eps)
    r = _as_rewards(rewards)
    b = _check_group_size(group_size, r.numel())
    grouped = r.view(b, group_size)  # [B, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    return _scale_groups(centred, grouped, scale, eps).view(-1)  # [B*G]


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards, group_size: int, *, scale: str = "group", eps: float = 1e-6) -> Tensor:
    """Group-relative advantages ``(r - mean) / (std + eps)`` (``scale="group"``).

    Args:
        rewards: ``[B*G]`` rewards, groups contiguous.
        group_size: ``G``.
        scale: ``"group"`` (paper), ``"batch"`` or ``"none"``.
        eps: Added to the std.

    Returns:
        ``[B*G]`` advantages.

    Example:
        >>> [round(a, 4) for a in grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 2).tolist()]
        [0.7071, -0.7071, 0.0, 0.0]
    """
    return _group_mean_baseline(rewards, group_size, scale=scale, eps=eps)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
def dr_grpo_advantages(rewards, group_size: int, *, scale: str = "none", eps: float = 1e-6) -> Tensor:
    """Mean-centred advantages ``r - mean`` (Dr.GRPO); ``scale`` as for :func:`grpo_advantages`.

    Returns:
        ``[B*G]`` advantages.
    """
    return _group_mean_baseline(rewards, group_size, scale=scale, eps=eps)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards, group_size: int, *, scale: str = "none", eps: float = 1e-6) -> Tensor:
    """Leave-one-out advantages ``r_i - mean_{j != i} r_j``.

    Args:
        rewards: ``[B*G]`` rewards, groups contiguous.
        group_size: ``G >= 2``.
        scale: ``"none"`` (RLOO), ``"group"`` or ``"batch"``.
        eps: Added to the std.

    Returns:
        ``[B*G]`` advantages.

    Raises:
        ValueError: if ``group_size < 2`` (no other sample to form the baseline).
    """
    _check_options(scale, eps)
    r = _as_rewards(rewards)
    b = _check_group_size(group_size, r.numel())
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2 (a baseline from the other outputs), got {group_size}")
    grouped = r.view(b, group_size)  # [B, G]
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)  # [B, G]
    return _scale_groups(grouped - others, grouped, scale, eps).view(-1)


# ----------------------------------------------------------------------------------------------------------
# process supervision
# ----------------------------------------------------------------------------------------------------------
def _flatten_steps(rewards, step_ends, num_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenates ragged per-output steps into ``values [S]``, ``ends [S]`` and ``owner [S]`` (output)."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int (the completion length T), got {num_tokens!r}")
    if step_ends is None:
        raise ValueError("process advantages need step_ends: one vector of step end token indices per output")
    if len(rewards) != len(step_ends):
        raise ValueError(f"rewards ({len(rewards)} outputs) and step_ends ({len(step_ends)}) must align")
    values, ends, owner = [], [], []
    for i, (r, e) in enumerate(zip(rewards, step_ends, strict=True)):
        r = torch.as_tensor(r).reshape(-1)
        e = torch.as_tensor(e, device=r.device).reshape(-1)
        if r.numel() != e.numel():
            raise ValueError(f"output {i}: {r.numel()} step rewards but {e.numel()} step_ends")
        if e.numel() and e.is_floating_point():
            raise ValueError(f"output {i}: step_ends must be integer token indices, got {e.dtype}")
        values.append(r)
        ends.append(e.long())
        owner.append(torch.full_like(ends[-1], i))
    if not values:
        empty = torch.zeros(0, dtype=torch.long)
        return torch.zeros(0), empty, empty
    flat = _as_rewards(torch.cat(values))
    ends_t, owner_t = torch.cat(ends).to(flat.device), torch.cat(owner).to(flat.device)
    if ends_t.numel() and (int(ends_t.min()) < 0 or int(ends_t.max()) >= num_tokens):
        lo, hi = int(ends_t.min()), int(ends_t.max())
        raise ValueError(f"step_ends must lie in [0, num_tokens={num_tokens}), got values in [{lo}, {hi}]")
    return flat, ends_t, owner_t


def _segment_stats(values: Tensor, seg: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-segment mean, unbiased std (0 below two values) and a "all values equal" flag, each ``[n]``."""
    zeros = torch.zeros(n, dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, seg, torch.ones_like(values))
    total = zeros.index_add(0, seg, values)
    mean = total / count.clamp(min=1)
    sq = zeros.index_add(0, seg, (values - mean[seg]) ** 2)
    std = torch.where(count > 1, sq / (count - 1).clamp(min=1), torch.zeros_like(sq)).sqrt()
    hi = torch.full_like(count, -torch.inf).scatter_reduce_(0, seg, values, "amax")
    lo = torch.full_like(count, torch.inf).scatter_reduce_(0, seg, values, "amin")
    return mean, std, hi <= lo  # empty segments read as flat too


@ADVANTAGE_ESTIMATORS.register("process")
def process_advantages(
    rewards: Sequence,
    group_size: int,
    *,
    step_ends: Sequence | None = None,
    num_tokens: int = 0,
    scale: str = "group",
    eps: float = 1e-6,
) -> Tensor:
    """DeepSeekMath process-supervision advantages.

    Args:
        rewards: ``B*G`` step-reward vectors (each ``[S_i]``, possibly empty), groups contiguous.
        group_size: ``G``.
        step_ends: ``B*G`` integer vectors ``[S_i]``: the completion-token index (0-based, inclusive) where
            each step ends.
        num_tokens: ``T``, the completion length of the output tensor.
        scale: ``"group"`` (paper: divide by the std of the group's step rewards), ``"batch"`` or ``"none"``.
        eps: Added to the std.

    Returns:
        ``[B*G, T]`` advantages: ``A[i, t] = sum of normalised step rewards of output i with end >= t``.

    Example:
        One group of two outputs; its step rewards ``[1, 0, 1]`` have mean 2/3 and std ``1/sqrt(3)``, so they
        normalise to ``[0.577, -1.155, 0.577]``:

        >>> adv = process_advantages([[1.0], [0.0, 1.0]], 2, step_ends=[[1], [0, 2]], num_tokens=3)
        >>> [[round(a, 3) for a in row] for row in adv.tolist()]
        [[0.577, 0.577, 0.0], [-0.577, 0.577, 0.577]]
    """
    _check_options(scale, eps)
    n = len(rewards)
    b = _check_group_size(group_size, n)
    values, ends, owner = _flatten_steps(rewards, step_ends, num_tokens)
    group = owner // group_size  # [S]
    mean, std, flat = _segment_stats(values, group, b)
    centred = values - mean[group]  # [S]
    if scale == "group":
        centred = centred / (std[group] + eps)
    elif scale == "batch" and not bool(flat.all()):
        centred = centred / (_safe_std(centred) + eps)
    normed = centred.masked_fill(flat[group], 0.0)  # [S]
    at_end = torch.zeros(n, num_tokens, dtype=values.dtype, device=values.device)  # [N, T]
    at_end.index_put_((owner, ends), normed, accumulate=True)
    return at_end.flip(1).cumsum(1).flip(1)  # [N, T] suffix sums: steps ending at or after t
