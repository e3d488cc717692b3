"""A weighted combination of rewards with a per-component breakdown (a rubric).

:class:`WeightedReward` scores a batch with every component (through :func:`rewards.protocol.call_reward`) and
combines the scores with one of the registered modes:

* ``sum``: ``total_i = sum_k w_k r_ki``;
* ``normalize-then-sum``: each component is first z-scored over the batch,
  ``z_ki = (r_ki - mean_k) / (std_k + eps)`` (mean and population std over the component's non-``None``
  scores; a component with a single score or no spread gets ``z = 0``), then ``total_i = sum_k w_k z_ki``.

``None`` ("no opinion") is defined as follows: a component that scores ``None`` for a sample contributes nothing
to that sample's total and the weights of the other components are **not** renormalised (so ``None`` and a
score of 0 give the same total in ``sum`` mode; in ``normalize-then-sum`` mode ``None`` also stays out of the
component's mean and std). A sample on which *every* component is ``None`` follows ``all_none``: ``"error"``
(default, a :class:`RewardError`) or ``"zero"`` (total 0.0). With ``normalize=True`` the totals are finally
z-scored over the batch (useful for logging or a batch-level baseline; GRPO normalises within groups anyway).

A component can be routed to part of the batch with ``RewardSpec.when`` (``{column: value}`` or
``{column: [values]}``): it scores only the samples whose columns match and leaves ``None`` on the others. That
is how DeepSeek-R1's second RL stage gives reasoning prompts rule rewards and general prompts reward models.

Example:
    >>> wr = combine({"a": lambda p, c, **_: [1.0, None], "b": lambda p, c, **_: [2.0, 4.0]},
    ...              weights={"a": 0.5, "b": 1.0})
    >>> out = wr(["q", "q"], ["x", "y"])
    >>> out.total, out.breakdown["a"]
    ([2.5, 4.0], [1.0, None])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from model.registry import Registry, check_fields
from rewards.protocol import ON_ERROR_POLICIES, OnError, RewardError, Scores, call_reward
from rewards.registry import get_reward

AllNone = Literal["error", "zero"]
CombineFn = Callable[[dict[str, Scores], dict[str, float], float], list[float | None]]
COMBINE_MODES: Registry[CombineFn] = Registry("reward combination mode")


@dataclass(frozen=True)
class RewardOutput:
    """Combined scores of a batch.

    Attributes:
        total: The combined reward per sample, ``B`` floats.
        breakdown: Raw scores per component name, ``B`` floats or ``None`` each.
    """

    total: list[float]
    breakdown: dict[str, Scores]

    def component_means(self) -> dict[str, float]:
        """Mean of each component over its non-``None`` scores (NaN when all are ``None``), plus ``total``."""
        means = {name: _mean([s for s in scores if s is not None]) for name, scores in self.breakdown.items()}
        means["total"] = _mean(self.total)
        return means


@dataclass(frozen=True)
class RewardSpec:
    """One component of a combination, as written in a recipe.

    Attributes:
        name: A registered reward name or a dotted path (``"pkg.module:func"``).
        weight: Its weight in the total.
        kwargs: Configuration passed to :func:`rewards.get_reward`.
        key: Name in the breakdown (defaults to ``name``).
        on_error: Per-component error policy (defaults to the combination's).
        when: Route the component to the samples whose dataset columns match every entry, ``{column: value}``
            or ``{column: [allowed values]}``; the other samples get ``None`` (no opinion) and are never passed
            to the reward. ``None``: every sample.
    """

    name: str
    weight: float = 1.0
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    key: str | None = None
    on_error: OnError | None = None
    when: Mapping[str, Any] | None = None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> RewardSpec:
        """Builds a spec from a recipe mapping, naming unknown keys."""
        check_fields(cls, spec, "reward spec key(s)", context=f" in {dict(spec)!r}")
        return cls(**spec)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"reward spec field 'name' must be a non-empty string, got {self.name!r}")
        _check_weight(self.key or self.name, self.weight)
        if self.on_error is not None and self.on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"reward spec {self.name!r}: on_error must be one of {ON_ERROR_POLICIES}, "
                             f"got {self.on_error!r}")
        _check_when(self.key or self.name, self.when)


@dataclass(frozen=True)
class _Component:
    key: str
    fn: Callable[..., Any]
    weight: float
    on_error: OnError | None
    when: Mapping[str, tuple[Any, ...]] | None = None


def _check_when(key: str, when: Any) -> Mapping[str, tuple[Any, ...]] | None:
    """Validates a ``when`` routing rule and returns it as ``{column: allowed values}``."""
    if when is None:
        return None
    if not isinstance(when, Mapping) or not when:
        raise ValueError(f"reward {key!r}: 'when' must be a non-empty mapping {{column: value or [values]}}, "
                         f"got {when!r}")
    rule = {}
    for column, allowed in when.items():
        if not isinstance(column, str) or not column:
            raise ValueError(f"reward {key!r}: 'when' keys must be column names, got {column!r}")
        values = tuple(allowed) if isinstance(allowed, (list, tuple, set, frozenset)) else (allowed,)
        if not values:
            raise ValueError(f"reward {key!r}: 'when.{column}' allows no value")
        rule[column] = values
    return rule


def _routed(key: str, rule: Mapping[str, tuple[Any, ...]], columns: Mapping[str, Any], batch_size: int
            ) -> list[int]:
    """Indices of the samples whose columns satisfy ``rule``."""
    for column in rule:
        if column not in columns:
            raise RewardError(key, f"'when' reads the column {column!r}, which the batch does not have "
                                   f"(columns: {sorted(columns)})")
        if len(columns[column]) != batch_size:
            raise RewardError(key, f"column {column!r} has {len(columns[column])} values for {batch_size} samples")
    return [i for i in range(batch_size) if all(columns[c][i] in allowed for c, allowed in rule.items())]


def _check_weight(key: str, weight: Any) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ValueError(f"weight of reward {key!r} must be a finite number, got {weight!r}")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ----------------------------------------------------------------------------------------------- modes
def _weighted_sum(breakdown: dict[str, Scores], weights: dict[str, float]) -> list[float | None]:
    """Per sample: sum of ``w_k r_k`` over components with a score; ``None`` when none has one."""
    batch_size = len(next(iter(breakdown.values())))
    totals: list[float | None] = []
    for i in range(batch_size):
        terms = [weights[k] * scores[i] for k, scores in breakdown.items() if scores[i] is not None]
        totals.append(sum(terms) if terms else None)
    return totals


def zscore(scores: Scores, eps: float = 1e-6) -> Scores:
    """Z-scores the non-``None`` values (population std); ``None`` stays ``None``; no spread gives 0.

    Example:
        >>> zscore([1.0, None, 3.0], eps=0.0)
        [-1.0, None, 1.0]
    """
    present = [s for s in scores if s is not None]
    if len(present) < 2:
        return [None if s is None else 0.0 for s in scores]
    mean = sum(present) / len(present)
    std = math.sqrt(sum((s - mean) ** 2 for s in present) / len(present))
    if std == 0.0:
        return [None if s is None else 0.0 for s in scores]
    return [None if s is None else (s - mean) / (std + eps) for s in scores]


@COMBINE_MODES.register("sum")
def _mode_sum(breakdown: dict[str, Scores], weights: dict[str, float], eps: float) -> list[float | None]:
    return _weighted_sum(breakdown, weights)


@COMBINE_MODES.register("normalize-then-sum")
def _mode_normalize_then_sum(
    breakdown: dict[str, Scores], weights: dict[str, float], eps: float
) -> list[float | None]:
    return _weighted_sum({k: zscore(v, eps) for k, v in breakdown.items()}, weights)


# ----------------------------------------------------------------------------------------------- combination
class WeightedReward:
    """A weighted combination of reward components; calling it returns a :class:`RewardOutput`.

    Args:
        components: ``{key: reward}`` (a callable, or a name/dotted path for :func:`rewards.get_reward`), or a
            sequence of :class:`RewardSpec` (or dicts with its fields).
        weights: ``{key: weight}`` for the mapping form (missing keys weigh 1.0; unknown keys are an error).
        mode: A name in :data:`COMBINE_MODES`: ``"sum"`` or ``"normalize-then-sum"``.
        normalize: Z-score the totals over the batch at the end.
        all_none: What a sample scored ``None`` by every component gets: ``"error"`` or ``"zero"``.
        on_error: Error policy of components without their own (see :func:`rewards.protocol.call_reward`).
        eps: Added to standard deviations.
    """

    def __init__(
        self,
        components: Mapping[str, Any] | Sequence[RewardSpec | Mapping[str, Any]],
        weights: Mapping[str, float] | None = None,
        *,
        mode: str = "sum",
        normalize: bool = False,
        all_none: AllNone = "error",
        on_error: OnError = "raise",
        eps: float = 1e-6,
    ) -> None:
        self.components = _build_components(components, weights)
        self.combine_fn = COMBINE_MODES.get(mode)
        if all_none not in ("error", "zero"):
            raise ValueError(f"all_none must be 'error' or 'zero', got {all_none!r}")
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ON_ERROR_POLICIES}, got {on_error!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.mode, self.normalize, self.all_none, self.on_error, self.eps = mode, normalize, all_none, on_error, eps

    @property
    def weights(self) -> dict[str, float]:
        """``{key: weight}`` of the components."""
        return {c.key: c.weight for c in self.components}

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> RewardOutput:
        """Scores a batch with every component and combines the scores.

        Raises:
            RewardError: from a component (policy ``"raise"``), or for a sample every component left ``None``
                when ``all_none="error"``.
        """
        breakdown = {c.key: self._score(c, prompts, completions, columns) for c in self.components}
        totals = self.combine_fn(breakdown, self.weights, self.eps)
        for i, t in enumerate(totals):
            if t is None and self.all_none == "error":
                raise RewardError("+".join(breakdown), "every component returned None (all_none='error')", i)
        total = [0.0 if t is None else t for t in totals]
        if self.normalize:
            total = [float(z) for z in zscore(total, self.eps)]
        return RewardOutput(total=total, breakdown=breakdown)

    def _score(self, c: _Component, prompts: Sequence[Any], completions: Sequence[Any],
               columns: Mapping[str, Any]) -> Scores:
        """One component's scores; a routed component sees only its samples and leaves ``None`` elsewhere."""
        on_error = c.on_error or self.on_error
        if c.when is None:
            return call_reward(c.fn, prompts, completions, name=c.key, on_error=on_error, **columns)
        keep = _routed(c.key, c.when, columns, len(completions))
        scores: list[float | None] = [None] * len(completions)
        if not keep:
            return scores
        try:
            sub = call_reward(c.fn, [prompts[i] for i in keep], [completions[i] for i in keep], name=c.key,
                              on_error=on_error, **{k: [v[i] for i in keep] for k, v in columns.items()})
        except RewardError as exc:  # report the sample's index in the whole batch
            if exc.index is None:
                raise
            raise RewardError(c.key, exc.message, keep[exc.index]) from exc
        for i, score in zip(keep, sub):
            scores[i] = score
        return scores


def _build_components(
    components: Mapping[str, Any] | Sequence[RewardSpec | Mapping[str, Any]], weights: Mapping[str, float] | None
) -> tuple[_Component, ...]:
    if isinstance(components, Mapping):
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(components))
        if unknown:
            raise ValueError(f"weights given for unknown reward(s) {unknown}; components: {sorted(components)}")
        built = []
        for key, fn in components.items():
            weight = weights.get(key, 1.0)
            _check_weight(key, weight)
            built.append(_Component(key, get_reward(fn) if isinstance(fn, str) else fn, float(weight), None))
    else:
        if weights is not None:
            raise ValueError("weights must be given inside each RewardSpec when components is a sequence")
        specs = [s if isinstance(s, RewardSpec) else RewardSpec.from_dict(s) for s in components]
        built = [_Component(s.key or s.name, get_reward(s.name, **s.kwargs), float(s.weight), s.on_error,
                            _check_when(s.key or s.name, s.when)) for s in specs]
    if not built:
        raise ValueError("a weighted reward needs at least one component")
    keys = [c.key for c in built]
    if len(set(keys)) != len(keys):
        raise ValueError(f"reward keys must be unique, got {keys}; set RewardSpec.key to tell them apart")
    for c in built:
        if not callable(c.fn):
            raise TypeError(f"reward {c.key!r} is not callable: {type(c.fn).__name__}")
    return tuple(built)


def combine(
    components: Mapping[str, Any] | Sequence[RewardSpec | Mapping[str, Any]],
    weights: Mapping[str, float] | None = None,
    **options: Any,
) -> WeightedReward:
    """Builds a :class:`WeightedReward` (see it for the arguments)."""
    return WeightedReward(components, weights, **options)
