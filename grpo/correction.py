"""The rollout-training mismatch: how far the engine that sampled is from the trainer, and importance-sampling
corrections for it.

The engine samples completions from ``pi_engine`` (vLLM in bfloat16 with its own kernels, or our engine); the
trainer's ratio uses its own log-probs of the same tokens, ``pi_old``. The two differ, so the policy gradient is
estimated with samples of the wrong distribution. Per completion token, with
``rho_t = pi_old(y_t) / pi_engine(y_t) = exp(old_logp_t - engine_logp_t)``, a correction is a detached weight
``w_t`` on the policy-gradient term (the KL term is left alone):

* ``none``: ``w_t = 1``;
* ``tis``, token-level truncated IS: ``w_t = min(rho_t, C)`` (Yao et al. 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"; TRL's and verl's ``vllm_importance_sampling``);
* ``mis``, token-level masked IS: ``w_t = rho_t`` inside ``[1/C, C]``, else 0 (the token is dropped: the
  "masked importance sampling"/IcePop variant);
* ``seq-tis`` and ``seq-mis``: the same on the sequence's geometric-mean ratio
  ``rho_i = exp(mean_t (old_logp_t - engine_logp_t))`` over its completion tokens, one weight for every token
  of the sequence (truncated at ``C``, or the whole sequence dropped outside ``[1/C, C]``).

``auto`` (:func:`resolve`) chooses ``none`` for an engine whose sampling log-probs are the trainer's own (our
float32 torch engine: the same model and kernels) and ``tis`` otherwise (vLLM).

:func:`mismatch_stats` measures the gap every step: the mean and max of ``|old_logp - engine_logp|`` over
completion tokens, and the k3 estimate of ``KL(pi_engine || pi_old)`` under the engine's samples,
``mean_t (rho_t - log rho_t - 1)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model.registry import Registry

Correction = Callable[[Tensor, Tensor, float], tuple[Tensor, Tensor]]
"""``(log_rho [N, T], mask [N, T] bool, cap) -> (weight [N, T], affected [N, T] bool)``: the detached weight of
each token's policy-gradient term, and which tokens it truncated or dropped."""

CORRECTIONS: Registry[Correction] = Registry("rollout correction")
LOG_RHO_CLAMP = 20.0  # as the policy ratio's (grpo.losses): exp(20) is finite in float32


@CORRECTIONS.register("none")
def _none(log_rho: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return torch.ones_like(log_rho), torch.zeros_like(mask)


@CORRECTIONS.register("tis")
def _tis(log_rho: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    rho = log_rho.exp()
    return rho.clamp(max=cap), (rho > cap) & mask


@CORRECTIONS.register("mis")
def _mis(log_rho: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    rho = log_rho.exp()
    outside = (rho > cap) | (rho < 1.0 / cap)
    return torch.where(outside, torch.zeros_like(rho), rho), outside & mask


def _sequence_log_rho(log_rho: Tensor, mask: Tensor) -> Tensor:
    """The geometric-mean log-ratio of each sequence, broadcast to its tokens. ``[N, T]``"""
    m = mask.to(log_rho.dtype)
    mean = (log_rho * m).sum(-1) / m.sum(-1).clamp(min=1.0)  # [N]
    return mean[:, None].expand_as(log_rho)


@CORRECTIONS.register("seq-tis")
def _seq_tis(log_rho: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return _tis(_sequence_log_rho(log_rho, mask), mask, cap)


@CORRECTIONS.register("seq-mis")
def _seq_mis(log_rho: Tensor, mask: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    return _mis(_sequence_log_rho(log_rho, mask), mask, cap)


def correction_weights(old_logp: Tensor, engine_logp: Tensor, mask: Tensor, kind: str, cap: float
                       ) -> tuple[Tensor, Tensor]:
    """The detached weights of a :data:`CORRECTIONS` entry.

    Args:
        old_logp: The trainer's log-probs of the sampled tokens. ``[N, T]``
        engine_logp: The engine's log-probs of the same tokens. ``[N, T]``
        mask: 1 at completion tokens. ``[N, T]``
        kind: A registered correction name (not ``auto``: see :func:`resolve`).
        cap: ``C > 1``.

    Returns:
        ``(weight, affected)``: ``[N, T]`` each; padding gets weight 1 and is never affected.
    """
    valid = mask != 0
    log_rho = torch.where(valid, old_logp.detach().float() - engine_logp.float(), torch.zeros_like(old_logp.float()))
    weight, affected = CORRECTIONS.get(kind)(log_rho.clamp(-LOG_RHO_CLAMP, LOG_RHO_CLAMP), valid, cap)
    return torch.where(valid, weight, torch.ones_like(weight)).detach(), affected


def resolve(kind: str, engine_matches_trainer: bool) -> str:
    """``auto`` -> ``none`` for an engine whose log-probs are the trainer's own, else ``tis``; other names as
    they are."""
    if kind != "auto":
        return kind
    return "none" if engine_matches_trainer else "tis"


def mismatch_stats(old_logp: Tensor, engine_logp: Tensor, mask: Tensor) -> dict[str, float]:
    """Sums and maxima of the engine-trainer gap over completion tokens (sums, so that ranks and micro-batches
    add up; :func:`mismatch_metrics` turns them into means).

    Returns:
        ``{"abs_sum", "abs_max", "kl_sum", "tokens"}``.
    """
    valid = mask != 0
    d = (old_logp.detach().float() - engine_logp.float())[valid].clamp(-LOG_RHO_CLAMP, LOG_RHO_CLAMP)
    if d.numel() == 0:
        return {"abs_sum": 0.0, "abs_max": 0.0, "kl_sum": 0.0, "tokens": 0.0}
    return {"abs_sum": float(d.abs().sum()), "abs_max": float(d.abs().max()),
            "kl_sum": float((d.exp() - d - 1.0).sum()), "tokens": float(d.numel())}


def mismatch_metrics(stats: dict[str, float], affected: float) -> dict[str, float]:
    """The logged metrics from summed :func:`mismatch_stats` and the count of corrected tokens."""
    n = max(stats["tokens"], 1.0)
    return {"mismatch/logp_abs_mean": stats["abs_sum"] / n, "mismatch/logp_abs_max": stats["abs_max"],
            "mismatch/kl": stats["kl_sum"] / n, "mismatch/corrected_frac": affected / n}
