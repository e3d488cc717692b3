"""KL estimators, loss aggregation and the clipped GRPO policy loss.

Notation: ``N`` completions of ``T`` tokens (padded), ``mask [N, T]`` marks real completion tokens,
``logp``/``old_logp``/``ref_logp`` are the per-token log-probs under the policy being trained, the policy that
sampled the completions, and the frozen reference.

KL estimators (``kl_penalty(logp, ref_logp, kind)``, with ``d = ref_logp - logp``):

* ``k1 = -d = logp - ref_logp``;
* ``k2 = d^2 / 2``;
* ``k3 = exp(d) - d - 1`` (DeepSeekMath's ``pi_ref/pi - log(pi_ref/pi) - 1``: unbiased for
  ``KL(pi || pi_ref)`` under samples of ``pi``, and >= 0).

Policy loss, per token with ratio ``r_t`` and advantage ``A``:
``surrogate_t = min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A)``;
``loss = agg(-(surrogate - beta * KL))``. Variants pick ``r_t``:

* ``vanilla``: ``r_t = exp(logp_t - old_logp_t)``;
* ``gspo``: the sequence ratio ``s_i = exp(mean_t (logp_t - old_logp_t))`` over the sequence's tokens,
  used per token as ``sg(s_i) * exp(logp_t - sg(logp_t))``: its value is ``s_i`` (so clipping acts on whole
  sequences) and its gradient ``s_i * grad logp_t``; with ``seq-mean-token-mean`` aggregation the gradient is
  exactly GSPO's ``A_i grad s_i``.

Dual clip (``clip_ratio_c = c > 1``): for ``A < 0`` the surrogate is floored at ``c * A``, so a token whose
ratio exploded above ``c`` cannot push the loss without bound.

Aggregation (``agg_loss``): ``token-mean`` (DAPO: sum over all valid tokens / their count),
``seq-mean-token-mean`` (DeepSeekMath: ``1/G sum_i 1/|o_i| sum_t``), ``seq-mean-token-sum`` and
``seq-mean-token-sum-norm`` (Dr.GRPO: ``sum_t / max_len``, ``max_len`` a constant defaulting to ``T``).

Where we depart from DeepSeek's formulas:

* Log-ratios are clamped to ``[-20, 20]`` before ``exp`` (the policy ratio, the GSPO sequence ratio and ``d``
  in ``k3``); ``exp(20)`` is about ``4.9e8``, finite in float32. Where the clamp is active its gradient is 0.
  KL values are computed in at least float32.
* Sequence means run over sequences with at least one valid token; rows whose mask is all zero are left out
  (the paper's ``1/G`` assumes every output has tokens). A batch without valid tokens gives a loss of 0.
* ``clip_low``/``clip_high`` may differ (DAPO's clip-higher); the paper uses one ``epsilon``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from model.registry import Registry

KL_ESTIMATORS: Registry[Callable[[Tensor, Tensor], Tensor]] = Registry("KL estimator")
AGG_MODES: Registry[Callable[..., Tensor]] = Registry("loss aggregation mode")
POLICY_RATIOS: Registry[Callable[[Tensor, Tensor, Tensor], Tensor]] = Registry("policy loss variant")
AGG_UNITS: Registry[Callable[[Tensor], Tensor]] = Registry("loss aggregation unit")
"""What each aggregation mode averages over, counted in a ``[N, T]`` mask: tokens (``token-mean``) or non-empty
sequences (the ``seq-mean-*`` modes). A micro-batch's weight in its minibatch is its share of these units."""

LOG_RATIO_CLAMP = 20.0

__all__ = ["AGG_MODES", "AGG_UNITS", "KL_ESTIMATORS", "POLICY_RATIOS", "agg_loss", "kl_penalty",
           "micro_batch_weight", "policy_loss"]


# ------------------------------------------------------------------------------------------------------------
# KL estimators
# ------------------------------------------------------------------------------------------------------------
def _log_ratio(ref_logp: Tensor, logp: Tensor) -> Tensor:
    dtype = torch.promote_types(logp.dtype, torch.float32)
    return ref_logp.to(dtype) - logp.to(dtype)


@KL_ESTIMATORS.register("k1")
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``logp - ref_logp`` (unbiased, can be negative per token)."""
    return -_log_ratio(ref_logp, logp)


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``(logp - ref_logp)^2 / 2`` (biased, low variance, >= 0)."""
    return 0.5 * _log_ratio(ref_logp, logp).square()


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """``exp(d) - d - 1`` with ``d = clamp(ref_logp - logp, -20, 20)`` (unbiased, >= 0)."""
    d = _log_ratio(ref_logp, logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.expm1(d) - d


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Element-wise KL estimate between the policy and the reference at the sampled tokens.

    Args:
        logp: Log-probs under the policy. ``[...]``
        ref_logp: Log-probs under the reference, same shape.
        kind: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).

    Returns:
        ``[...]`` estimates, in ``logp``'s dtype promoted to at least float32.

    Raises:
        KeyError: for an unknown ``kind``.
        ValueError: when the shapes differ.

    Example:
        >>> kl_penalty(torch.tensor([0.0]), torch.tensor([1.0]), "k3")  # e - 1 - 1
        tensor([0.7183])
    """
    fn = KL_ESTIMATORS.get(kind)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logp must have logp's shape {tuple(logp.shape)}, got {tuple(ref_logp.shape)}")
    return fn(logp, ref_logp)


# ------------------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------------------
def _seq_mean(per_seq: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``per_seq [N]`` over rows of ``mask [N, T]`` with at least one valid token (0 if none)."""
    has_tokens = (mask != 0).any(dim=-1).to(per_seq.dtype)  # [N]
    return (per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)


@AGG_MODES.register("token-mean")
def agg_token_mean(loss_mat: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Sum over all valid tokens divided by their count (DAPO)."""
    return (loss_mat * mask).sum() / mask.sum().clamp(min=1)


@AGG_MODES.register("seq-mean-token-mean")
def agg_seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Per-sequence token mean, then the mean over sequences (DeepSeekMath)."""
    per_seq = (loss_mat * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
    return _seq_mean(per_seq, mask)


@AGG_MODES.register("seq-mean-token-sum")
def agg_seq_mean_token_sum(loss_mat: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Per-sequence token sum, then the mean over sequences."""
    return _seq_mean((loss_mat * mask).sum(-1), mask)


@AGG_MODES.register("seq-mean-token-sum-norm")
def agg_seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Per-sequence token sum divided by the constant ``max_len``, then the mean over sequences (Dr.GRPO)."""
    return _seq_mean((loss_mat * mask).sum(-1) / max_len, mask)


def _tokens(mask: Tensor) -> Tensor:
    return mask.sum()


def _sequences(mask: Tensor) -> Tensor:
    return (mask.sum(-1) > 0).sum()  # seq-mean modes skip empty rows


AGG_UNITS.add("token-mean", _tokens)
for _mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
    AGG_UNITS.add(_mode, _sequences)


def micro_batch_weight(mode: str, micro_mask: Tensor, minibatch_mask: Tensor) -> Tensor:
    """The weight of a micro-batch's aggregated loss so that accumulating the micro-batches of a minibatch equals
    one pass over it: its share of the minibatch's units (tokens or sequences, :data:`AGG_UNITS`).

    Args:
        mode: Aggregation mode.
        micro_mask: The micro-batch's completion mask. ``[n, T]``
        minibatch_mask: The whole minibatch's. ``[N, T]``
    """
    unit = AGG_UNITS.get(mode)
    return unit(micro_mask) / unit(minibatch_mask).clamp(min=1)


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str, *, max_len: int | None = None) -> Tensor:
    """Reduces a per-token loss to a scalar.

    Args:
        loss_mat: Per-token loss. ``[N, T]``
        mask: 1 (or True) at valid tokens, 0 elsewhere. ``[N, T]``
        mode: ``token-mean``, ``seq-mean-token-mean``, ``seq-mean-token-sum`` or ``seq-mean-token-sum-norm``.
        max_len: The constant divisor of ``seq-mean-token-sum-norm`` (default ``T``); other modes ignore it.

    Returns:
        A scalar tensor; 0 (never NaN) when no token is valid.

    Raises:
        KeyError: for an unknown ``mode``.
        ValueError: on mismatched shapes or a non-positive ``max_len``.
    """
    fn = AGG_MODES.get(mode)
    if loss_mat.dim() != 2:
        raise ValueError(f"loss_mat must be [N, T], got shape {tuple(loss_mat.shape)}")
    if mask.shape != loss_mat.shape:
        raise ValueError(f"mask must have loss_mat's shape {tuple(loss_mat.shape)}, got {tuple(mask.shape)}")
    if max_len is None:
        max_len = loss_mat.shape[1]
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    return fn(loss_mat, mask.to(loss_mat.dtype), max_len)


# ------------------------------------------------------------------------------------------------------------
# policy-loss variants: each returns the per-token importance ratio [N, T] carrying the gradient
# ------------------------------------------------------------------------------------------------------------
@POLICY_RATIOS.register("vanilla")
def vanilla_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """Token-level ratio ``exp(clamp(logp - old_logp))``. ``[N, T]``"""
    return torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


@POLICY_RATIOS.register("gspo")
def gspo_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's sequence ratio broadcast to tokens: value ``s_i``, gradient ``s_i * grad logp_t``. ``[N, T]``"""
    seq_log_ratio = ((logp - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
    seq_log_ratio = seq_log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(seq_log_ratio[:, None] + logp - logp.detach())  # [N, T]


def _check_policy_args(logp, old_logp, advantages, mask, ref_logp, clip_low, clip_high, beta, clip_ratio_c):
    if logp.dim() != 2:
        raise ValueError(f"logp must be [N, T], got shape {tuple(logp.shape)}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have logp's shape {shape}, got {tuple(t.shape)}")
    if tuple(advantages.shape) not in (shape[:1], shape):
        got = tuple(advantages.shape)
        raise ValueError(f"advantages must be [N]={shape[:1]} or [N, T]={shape}, got {got}")
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if not beta >= 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (the reference policy's log-probs)")
    if clip_ratio_c is not None and not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c must be > 1 (a lower bound c*A for negative A), got {clip_ratio_c}")


def _masked_mean(x: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    return (x * valid).sum() / count


def _masked_extreme(x: Tensor, valid: Tensor, which: str) -> Tensor:
    """Max or min of ``x`` over ``valid`` entries; 0 when there are none (no host sync)."""
    if x.numel() == 0:
        return x.new_zeros(())
    fill = -torch.inf if which == "max" else torch.inf
    filled = x.masked_fill(~valid, fill)
    extreme = filled.max() if which == "max" else filled.min()
    return torch.where(valid.any(), extreme, torch.zeros_like(extreme))


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    agg: str = "seq-mean-token-mean",
    variant: str = "vanilla",
    max_len: int | None = None,
    clip_ratio_c: float | None = None,
    pg_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The clipped GRPO objective, negated, with an optional KL penalty to the reference.

    Args:
        logp: Log-probs of the sampled tokens under the policy being trained (differentiable). ``[N, T]``
        old_logp: Log-probs under the sampling policy (treated as constants). ``[N, T]``
        advantages: Per-sequence ``[N]`` or per-token ``[N, T]`` advantages (treated as constants).
        mask: 1 (or True) at completion tokens, 0 at padding (ignored there, even NaN or inf). ``[N, T]``
        clip_low, clip_high: Clip ranges: ratios outside ``[1 - clip_low, 1 + clip_high]`` are clipped.
        ref_logp: Log-probs under the reference policy; needed when ``beta > 0``. ``[N, T]``
        beta: KL penalty weight.
        kl: KL estimator name (``k1 | k2 | k3``).
        agg: Aggregation mode (see :func:`agg_loss`).
        variant: Importance-ratio variant (``vanilla | gspo``).
        max_len: Divisor for ``agg="seq-mean-token-sum-norm"`` (defaults to ``T``).
        clip_ratio_c: Dual-clip constant ``c > 1``; ``None`` turns dual clipping off.
        pg_weight: Constant per-token weights of the policy-gradient term, not the KL's (:mod:`grpo.correction`).

    Returns:
        ``(loss, metrics)``: the scalar loss to minimise and floats measured over valid tokens:
        ``loss``, ``pg_loss`` (``agg(-surrogate)``), ``kl_loss`` (``agg(KL)``, unweighted; ``loss = pg_loss +
        beta * kl_loss``), ``kl`` (token mean of KL, 0 without ``ref_logp``), ``clip_frac`` (share of tokens
        where the clipped branch is active), ``dual_clip_frac``, ``ratio_mean``, ``ratio_max``, ``ratio_min``,
        ``approx_kl`` (token mean of k3 between the sampling and the current policy,
        ``exp(logp - old_logp) - (logp - old_logp) - 1``), ``num_tokens``. Token means read 0 without tokens.

    Raises:
        KeyError: for an unknown ``kl``, ``agg`` or ``variant``.
        ValueError: on mismatched shapes or out-of-range hyper-parameters.
    """
    ratio_fn = POLICY_RATIOS.get(variant)
    AGG_MODES.get(agg), KL_ESTIMATORS.get(kl)  # unknown names fail before any work
    _check_policy_args(logp, old_logp, advantages, mask, ref_logp, clip_low, clip_high, beta, clip_ratio_c)
    valid = mask != 0  # [N, T]
    mask = mask.to(logp.dtype)
    logp, old_logp, adv, ref_logp = _masked_inputs(valid, logp, old_logp, advantages, ref_logp)
    ratio = ratio_fn(logp, old_logp, mask)  # [N, T]
    surrogate = _clipped_surrogate(ratio, adv, clip_low, clip_high, clip_ratio_c, pg_weight, valid)  # [N, T]
    kl_mat = kl_penalty(logp, ref_logp, kl) if ref_logp is not None else torch.zeros_like(logp)  # [N, T]
    loss_mat = -surrogate + beta * kl_mat if beta > 0 else -surrogate  # [N, T]
    loss = agg_loss(loss_mat, mask, agg, max_len=max_len)
    stats = _loss_stats(loss, logp, old_logp, ratio, adv, surrogate, kl_mat, mask, valid, agg=agg, max_len=max_len,
                        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c)
    return loss, stats


def _clipped_surrogate(ratio: Tensor, adv: Tensor, clip_low: float, clip_high: float, clip_ratio_c: float | None,
                       weight: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
    """``min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A)``, and with dual clipping at most ``c A`` away
    from zero for negative advantages; times the constant ``weight`` at ``valid`` tokens when given. ``[N, T]``"""
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    if clip_ratio_c is not None:
        surrogate = torch.where(adv < 0, torch.maximum(surrogate, clip_ratio_c * adv), surrogate)
    if weight is not None:
        surrogate = surrogate * torch.where(valid, weight.detach().to(surrogate.dtype), 0.0)
    return surrogate


def _masked_inputs(valid: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor, ref_logp: Tensor | None
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The loss inputs with padding zeroed (it may hold anything, -inf log-probs or NaN, and neither the loss nor
    its gradient may see it); constants detached; advantages broadcast to ``[N, T]``."""
    adv = advantages.detach().to(logp.dtype)
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv  # [N, T]
    logp, old_logp, adv = (torch.where(valid, x, torch.zeros_like(x)) for x in (logp, old_logp.detach(), adv))
    if ref_logp is not None:
        ref_logp = torch.where(valid, ref_logp.detach(), torch.zeros_like(ref_logp))
    return logp, old_logp, adv, ref_logp


@torch.no_grad()
def _loss_stats(loss: Tensor, logp: Tensor, old_logp: Tensor, ratio: Tensor, adv: Tensor, surrogate: Tensor,
                kl_mat: Tensor, mask: Tensor, valid: Tensor, *, agg: str, max_len: int | None, clip_low: float,
                clip_high: float, clip_ratio_c: float | None) -> dict[str, float]:
    """The metrics of :func:`policy_loss`, over valid tokens, read back in one device sync."""
    count = valid.sum().clamp(min=1).to(logp.dtype)
    r = ratio.detach()
    clip_active = ((adv > 0) & (r > 1.0 + clip_high)) | ((adv < 0) & (r < 1.0 - clip_low))
    dual_active = (adv < 0) & (r > clip_ratio_c) if clip_ratio_c is not None else torch.zeros_like(valid)
    log_r = (logp.detach() - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    stats = {
        "loss": loss.detach(),
        "pg_loss": agg_loss(-surrogate.detach(), mask, agg, max_len=max_len),
        "kl_loss": agg_loss(kl_mat.detach().to(logp.dtype), mask, agg, max_len=max_len),
        "kl": _masked_mean(kl_mat.detach().to(logp.dtype), valid, count),
        "clip_frac": _masked_mean(clip_active.to(r.dtype), valid, count),
        "dual_clip_frac": _masked_mean(dual_active.to(r.dtype), valid, count),
        "ratio_mean": _masked_mean(r, valid, count),
        "ratio_max": _masked_extreme(r, valid, "max"),
        "ratio_min": _masked_extreme(r, valid, "min"),
        "approx_kl": _masked_mean(torch.expm1(log_r) - log_r, valid, count),
        "num_tokens": valid.sum().to(r.dtype),
    }
    values = torch.stack([v.to(torch.float64) for v in stats.values()]).tolist()  # one device sync
    return dict(zip(stats, values, strict=True))
