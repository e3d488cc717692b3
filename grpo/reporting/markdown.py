"""Markdown, the one place that writes it: the run report (:func:`run_report`) and the evaluation results
table (:func:`results_table`), with one number formatter (:func:`fmt`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from grpo.reporting.run_report import PhaseEval


def fmt(value: float | None, spec: str = ".3f", suffix: str = "") -> str:
    """A number for a table cell: formatted with ``spec`` and ``suffix``, or ``n/a`` when not measured."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


WIDTH = 100  # every line of a report table fits in this many characters


def _pct(value: float | None) -> str:
    return fmt(None if value is None else 100 * value, ".1f", "%")


def accuracy_table(evals: Mapping[str, PhaseEval]) -> list[str]:
    """A row per phase: held-out accuracy, then the optional numbers any phase reported (format rate, length,
    n, pass@k ...)."""
    optional: list[tuple[str, Callable[[PhaseEval], str]]] = [
        ("format rate", lambda e: _pct(e.format_rate)),
        ("length", lambda e: fmt(e.length_mean, ".4g")),
        ("n", lambda e: fmt(e.n, "d")),
    ]
    optional += [(k, lambda e, k=k: fmt(e.extra.get(k), ".4g"))
                 for k in dict.fromkeys(k for e in evals.values() for k in e.extra)]
    columns = [("accuracy", lambda e: _pct(e.accuracy))]
    columns += [(name, cell) for name, cell in optional if any(cell(e) != "n/a" for e in evals.values())]
    rows = ["| phase | " + " | ".join(name for name, _ in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    rows += [f"| {phase} | " + " | ".join(cell(e) for _, cell in columns) + " |" for phase, e in evals.items()]
    return rows


def reward_table(evals: Mapping[str, PhaseEval], sampled: str, stage2: str) -> list[str]:
    """A row per reward, a column per phase; a reward also measured over sampled completions (its name with
    the ``sampled`` suffix) reads ``greedy / sampled`` in one cell. A component named like a held-out metric
    carries the ``stage2`` suffix over greedy completions (``accuracy (stage-2 prompts)``) and pairs with
    ``accuracy (sampled)``; the held-out ``accuracy`` itself has no sampled twin."""
    names = [k for k in dict.fromkeys(k for e in evals.values() for k in e.rewards) if not k.endswith(sampled)
             and not all(e.rewards.get(k) == e.accuracy for e in evals.values())]  # the accuracy table has it
    if not names:
        return []

    def twin(name: str) -> str | None:
        if name.endswith(stage2):
            return name.removesuffix(stage2) + sampled
        return None if name + stage2 in names else name + sampled

    both = any(twin(k) in e.rewards for e in evals.values() for k in names)
    spec = ".2f" if both else ".3f"

    def cell(e: PhaseEval, name: str) -> str:
        greedy, other = fmt(e.rewards.get(name), spec), twin(name)
        return f"{greedy} / {fmt(e.rewards.get(other), spec)}" if other in e.rewards else greedy

    rows = ["| reward | " + " | ".join(evals) + " |", "|---" + "|---:" * len(evals) + "|"]
    rows += [f"| {name} | " + " | ".join(cell(e, name) for e in evals.values()) + " |" for name in names]
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The report's first lines: the stage-1 gain, the stage-2 preference change, the alignment tax and the wall
    time per phase (each when the run has it)."""
    lines = []
    s1 = summary.get("stage1")
    if s1 is not None:
        lines.append(f"- **Stage 1** ({s1['from']} -> {s1['to']}): held-out accuracy {_pct(s1['accuracy_from'])} "
                     f"-> {_pct(s1['accuracy_to'])}, {fmt(s1['gain_points'], '+.1f', ' points')}")
    s2 = summary.get("stage2")
    if s2 is not None:
        changes = ", ".join(f"{k} {fmt(v, '+.3f')}" for k, v in s2["change"].items()) or "n/a"
        lines.append(f"- **Stage 2** ({s2['from']} -> {s2['to']}): preference reward change {changes}")
    if "alignment_tax_points" in summary:
        lines.append(f"- **Alignment tax**: {fmt(summary['alignment_tax_points'], '+.1f', ' points')} of "
                     f"held-out accuracy lost in stage 2 (negative: gained)")
    wall = summary.get("wall_seconds") or {}
    if wall:
        parts = ", ".join(f"{phase} {_minutes(s)}" for phase, s in wall.items())
        lines.append(f"- **Wall time**: {_minutes(sum(wall.values()))} ({parts})")
    return lines


def mismatch_table(mismatch: Mapping[str, Mapping[str, float]]) -> list[str]:
    """A row per RL phase: the engine-trainer mismatch over its steps (see :mod:`grpo.correction`)."""
    lines = ["| phase | steps | mean abs log-p gap | max gap | KL(engine, trainer) | corrected | routes differ |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {phase} | {m['steps']:.0f} | {m['logp_abs_mean']:.3g} | {m['logp_abs_max']:.3g} | {m['kl']:.3g} "
              f"| {100 * m['corrected_frac']:.2f}% | {fmt(_scaled(m.get('routing_disagreement')), '.2f', '%')} |"
              for phase, m in mismatch.items()]
    return lines


def _scaled(value: float | None) -> float | None:
    return None if value is None else 100 * value


def settings_table(settings: Mapping[str, Any]) -> list[str]:
    """``| setting | value |`` rows; a value too long for :data:`WIDTH` is cut (``recipe.yaml`` has it all)."""
    rows = ["| setting | value |", "|---|---|"]
    for key, value in settings.items():
        room = WIDTH - len(key) - 7
        text = str(value)
        rows.append(f"| {key} | {text if len(text) <= room else text[:room - 3] + '...'} |")
    return rows


def run_report(run_dir: Path, evals: Mapping[str, PhaseEval], report: Mapping[str, Any], plots: Sequence[Path],
               suffixes: tuple[str, str]) -> str:
    """``report.md``: the summary, the held-out tables, the mismatch, the plots, the recipe and the notes.

    Args:
        run_dir: The run folder (plots are linked relative to it).
        evals: Phase -> its held-out evaluation, in run order.
        report: What ``report.json`` holds (``summary``, ``mismatch``, ``settings``, ``notes``).
        plots: The PNGs drawn.
        suffixes: The suffixes of rewards measured over sampled completions and of stage-2 components named
            like a held-out metric (see :func:`reward_table`).
    """
    out = [f"# Run report: {run_dir.resolve().name}", ""]
    summary = summary_lines(report["summary"])
    if summary:
        out += ["## Summary", "", *summary, ""]
    if evals:
        out += ["## Held-out accuracy after each phase", "", *accuracy_table(evals), ""]
        rewards = reward_table(evals, *suffixes)
        if rewards:
            out += ["## Rewards after each phase", "", "Mean reward on the held-out prompts of each kind; a cell "
                    "`a / b` is over greedy / sampled completions.", "", *rewards, ""]
    if report["mismatch"]:
        out += ["## Rollout-training mismatch", "", "Per RL phase, the engine's log-probs of its samples against "
                "the trainer's (means over steps; the max over all of them), and the share of (token, MoE layer) "
                "expert choices the trainer's router makes otherwise than the engine's did.", "",
                *mismatch_table(report["mismatch"]), ""]
    if plots:
        out += ["## Training curves", ""]
        for p in plots:
            out += [f"![{p.stem}]({Path(os.path.relpath(p, run_dir)).as_posix()})", ""]
    if report["settings"]:
        out += ["## Recipe", "", "Learning rates, KL weights, temperatures and weight decays are the values the run "
                "logged at each step; `recipe.yaml` has the whole recipe.", "", *settings_table(report["settings"]), ""]
    if report["notes"]:
        out += ["## Notes", "", *(f"- {n}" for n in report["notes"]), ""]
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
