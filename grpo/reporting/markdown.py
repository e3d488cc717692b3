"""Markdown, the one place that writes it: the run report (:func:`run_report`) and the evaluation results
table (:func:`results_table`), with one number formatter (:func:`fmt`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpo.phases import RL_PREF, RL_REASON

if TYPE_CHECKING:
    from grpo.reporting.run_report import PhaseEval


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    """A number for a table cell: formatted with ``spec`` and ``suffix``, or ``n/a`` when not measured."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def phase_table(evals: Mapping[str, PhaseEval]) -> list[str]:
    """Markdown table: a row per phase; accuracy, the optional numbers any phase reported and each reward's mean."""
    def pct(value: float | None) -> str:
        return fmt(None if value is None else 100 * value, ".1f", "%")

    optional: list[tuple[str, Callable[[PhaseEval], str]]] = [
        ("format rate", lambda e: pct(e.format_rate)),
        ("length", lambda e: fmt(e.length_mean, ".4g")),
        ("n", lambda e: fmt(e.n, "d")),
    ]
    optional += [(k, lambda e, k=k: fmt(e.extra.get(k), ".4g"))
                 for k in dict.fromkeys(k for e in evals.values() for k in e.extra)]
    columns = [("accuracy", lambda e: pct(e.accuracy))]
    columns += [(name, cell) for name, cell in optional if any(cell(e) != "n/a" for e in evals.values())]
    columns += [(f"reward: {k}", lambda e, k=k: fmt(e.rewards.get(k), ".3f"))
                for k in dict.fromkeys(k for e in evals.values() for k in e.rewards)]
    rows = ["| phase | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows += [f"| {phase} | " + " | ".join(cell(e) for _, cell in columns) + " |" for phase, e in evals.items()]
    return rows


def delta_lines(deltas: Mapping[str, Any], tax: float | None, phases: Sequence[str]) -> list[str]:
    lines = []
    s1 = deltas["stage1_accuracy_gain_points"]
    if s1 is not None:
        lines.append(f"- Stage 1 accuracy gain ({s1['from']} -> {s1['to']}): {fmt(s1['value'], '+.1f', ' points')}")
    s2 = deltas["stage2_reward_change"]
    if s2 is not None:
        changes = ", ".join(f"{k} {fmt(s2['values'][k], '+.3f')}" for k in s2["preference"]) or "n/a"
        lines.append(f"- Stage 2 preference reward change ({s2['from']} -> {s2['to']}): {changes}")
    if RL_REASON in phases and RL_PREF in phases:
        lines.append(f"- Alignment tax (accuracy lost from {RL_REASON} to {RL_PREF}): {fmt(tax, '+.1f', ' points')}")
    return lines


def mismatch_table(mismatch: Mapping[str, Mapping[str, float]]) -> list[str]:
    """A row per RL phase: the engine-trainer mismatch over its steps (see :mod:`grpo.correction`)."""
    lines = ["| phase | steps | mean abs log-prob gap | max abs gap | KL(engine, trainer) | corrected tokens |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {phase} | {m['steps']:.0f} | {m['logp_abs_mean']:.3g} | {m['logp_abs_max']:.3g} | {m['kl']:.3g} "
              f"| {100 * m['corrected_frac']:.2f}% |" for phase, m in mismatch.items()]
    return lines


def run_report(run_dir: Path, evals: Mapping[str, PhaseEval], deltas: Mapping[str, Any], tax: float | None,
              plots: Sequence[Path], settings: Mapping[str, Any], notes: Sequence[str],
              mismatch: Mapping[str, Mapping[str, float]] | None = None) -> str:
    out = [f"# Run report: {run_dir.resolve().name}", ""]
    if evals:
        out += ["## Held-out evaluation after each phase", "", *phase_table(evals), ""]
        deltas_md = delta_lines(deltas, tax, list(evals))
        if deltas_md:
            out += ["## Deltas", "", *deltas_md, ""]
    if mismatch:
        out += ["## Rollout-training mismatch", "", "Per RL phase, the engine's log-probs of its samples against "
                "the trainer's (means over steps; the max over all of them).", "", *mismatch_table(mismatch), ""]
    if plots:
        out += ["## Training curves", ""]
        for p in plots:
            out += [f"![{p.stem}]({Path(os.path.relpath(p, run_dir)).as_posix()})", ""]
    if settings:
        out += ["## Recipe", "", "Learning rates, KL weights, temperatures and weight decays are the values the run "
                "logged at each step.", "", "| setting | value |", "|---|---|"]
        out += [f"| {k} | {v} |" for k, v in settings.items()] + [""]
    if notes:
        out += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(out)


def results_table(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[float | None]]],
                  digits: Callable[[str], int] = lambda key: 3) -> list[str]:
    """A metric-per-row table: one column per checkpoint, ``digits(metric)`` decimals per row."""
    lines = ["| metric | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for key, values in rows:
        lines.append(f"| {key} | " + " | ".join(fmt(v, f".{digits(key)}f") for v in values) + " |")
    return lines


def win_rate_table(baseline: str, win_rates: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """Reward-model win rates of each checkpoint (columns) against ``baseline``, a reward per row."""
    if not win_rates:
        return []
    challengers = list(next(iter(win_rates.values())))
    lines = [f"Win rate against {baseline} (greedy completions; ties count half)", "",
             "| reward model | " + " | ".join(challengers) + " |", "| --- |" + " ---: |" * len(challengers)]
    lines += [f"| {reward} | " + " | ".join(fmt(row[c]) for c in challengers) + " |"
              for reward, row in win_rates.items()]
    return lines
