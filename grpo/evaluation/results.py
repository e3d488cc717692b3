"""An evaluation's results folder: ``results.json``, ``results.md`` (one column per checkpoint, win rates),
``completions.jsonl`` and PNG bar charts (drawn by :mod:`grpo.reporting.charts`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo.evaluation.comparison import Comparison, is_token_count, summary_rows
from grpo.evaluation.runner import EvalResult
from grpo.reporting.charts import bar_chart
from grpo.reporting.markdown import results_table, win_rate_table


def results_markdown(results: Sequence[EvalResult], comparison: Comparison | None) -> str:
    """A markdown table of every metric (one column per checkpoint) and, if given, the win-rate table."""
    lines = results_table([r.name for r in results], summary_rows(results),
                          digits=lambda key: 1 if is_token_count(key) else 3)
    if comparison is not None and comparison.win_rates:
        lines += ["", *win_rate_table(comparison.baseline, comparison.win_rates)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Chart:
    """One bar chart of the report: which metrics it shows and its y range (``None``: automatic)."""

    title: str
    keep: Callable[[str], bool]
    ylim: tuple[float, float] | None = None


CHARTS: dict[str, _Chart] = {
    "accuracy": _Chart("accuracy and rates (greedy; pass@k, maj@k from samples)",
                       lambda k: k in ("greedy_accuracy", "format_rate", "answer_rate", "length/truncated")
                       or "@" in k, (0.0, 1.05)),
    "rewards": _Chart("mean reward of the greedy completions", lambda k: k.startswith("reward/")),
    "lengths": _Chart("greedy completion length (tokens)", lambda k: k.startswith("length/") and is_token_count(k)),
}


def _charts(out: Path, results: Sequence[EvalResult], comparison: Comparison | None) -> list[Path]:
    """Writes the bar charts of :data:`CHARTS` (and the win rates); returns their paths."""
    rows = summary_rows(results)
    written = []
    for name, chart in CHARTS.items():
        picked = [(key, values) for key, values in rows if chart.keep(key)]
        if picked:
            series = {r.name: [values[i] for _, values in picked] for i, r in enumerate(results)}
            bar_chart(out / f"{name}.png", chart.title, [key for key, _ in picked], series, chart.ylim)
            written.append(out / f"{name}.png")
    if comparison is not None and comparison.win_rates:
        challengers = list(next(iter(comparison.win_rates.values())))
        series = {c: [row[c] for row in comparison.win_rates.values()] for c in challengers}
        bar_chart(out / "win_rate.png", f"reward-model win rate against {comparison.baseline} (ties count half)",
                   list(comparison.win_rates), series, ylim=(0.0, 1.05), hline=0.5)
        written.append(out / "win_rate.png")
    return written


def write_results(out: str | Path, results: Sequence[EvalResult], comparison: Comparison | None = None,
                 meta: Mapping[str, Any] | None = None) -> list[Path]:
    """Writes ``results.json``, ``results.md``, ``completions.jsonl`` and PNG bar charts into ``out``.

    Returns:
        The paths written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": dict(meta or {}),
        "config": dataclasses.asdict(results[0].config) if results else None,
        "results": [r.to_dict() for r in results],
        "comparison": dataclasses.asdict(comparison) if comparison else None,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "results.md").write_text(results_markdown(results, comparison))
    with (out / "completions.jsonl").open("w") as f:
        for r in results:
            for p in r.prompts:
                f.write(json.dumps({"checkpoint": r.name, **dataclasses.asdict(p)}, default=str) + "\n")
    return [out / "results.json", out / "results.md", out / "completions.jsonl", *_charts(out, results, comparison)]
