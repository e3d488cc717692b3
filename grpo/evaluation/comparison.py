"""Several checkpoints side by side: reward-model win rates against the first, and one metric table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from grpo.evaluation.config import EvalError
from grpo.evaluation.metrics import win_rate
from grpo.evaluation.runner import EvalResult


@dataclass(frozen=True)
class Comparison:
    """Win rates of later checkpoints against the first.

    Attributes:
        baseline: Name of the first checkpoint (A).
        win_rates: ``{reward name: {checkpoint B: win rate of B over A}}`` (``None`` when no prompt has both
            scores).
    """

    baseline: str
    win_rates: dict[str, dict[str, float | None]]


def compare(results: Sequence[EvalResult], reward_names: Sequence[str]) -> Comparison:
    """Reward win rates of ``results[1:]`` over ``results[0]`` on the same prompts.

    Raises:
        EvalError: for fewer than two results, results on different prompts, or a reward a result lacks.
    """
    if len(results) < 2:
        raise EvalError(f"compare needs two or more results, got {len(results)}")
    base = results[0]
    for other in results[1:]:
        if [p.prompt for p in other.prompts] != [p.prompt for p in base.prompts]:
            raise EvalError(f"{other.name!r} and {base.name!r} were evaluated on different prompts")
    table: dict[str, dict[str, float | None]] = {}
    for reward in reward_names:
        if any(reward not in p.scores for r in results for p in r.prompts):
            raise EvalError(f"reward {reward!r} was not scored for every checkpoint")
        a = [p.scores[reward] for p in base.prompts]
        table[reward] = {other.name: win_rate(a, [p.scores[reward] for p in other.prompts]) for other in results[1:]}
    return Comparison(baseline=base.name, win_rates=table)


def summary_rows(results: Sequence[EvalResult]) -> list[tuple[str, list[float | None]]]:
    """Side-by-side metric rows: ``(metric, [value per checkpoint])`` in a fixed order."""
    keys: list[str] = []
    for r in results:
        keys.extend(k for k in r.metrics() if k not in keys)
    return [(key, [r.metrics().get(key) for r in results]) for key in keys]


def is_token_count(key: str) -> bool:
    """Whether a metric counts tokens (shown with one decimal)."""
    return key.startswith(("length/", "sample_length/")) and not key.endswith("/truncated")
