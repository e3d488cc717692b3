"""Charts, the one place that draws: the run's training curves (:func:`plot_metrics`) and grouped bar charts
(:func:`bar_chart`, for evaluation results). Every PNG is written atomically; matplotlib is imported only when a
chart is drawn.

Curves put the RL phases (every phase but ``sft``, ``rm`` and ``eval``) end to end on one global step axis in the
order they first appear in the log; phase ``p`` covers ``offset_p + 1 .. offset_p + (max_step - min_step + 1)``
and dashed lines mark the boundaries. When a phase logs the same step twice, the last value wins.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo.phases import EVAL, RM, SFT
from grpo.reporting.metrics_log import RESERVED_KEYS, read_metrics
from model.files import atomic_write_bytes

PLOTS_DIR = "plots"
NON_RL_PHASES = frozenset({SFT, RM, EVAL})


@dataclass(frozen=True)
class PlotSpec:
    """One PNG: a panel per selected metric key, with one line per phase.

    Attributes:
        name: File stem in the plots folder.
        title: Figure title.
        keys: Given the keys present in the plotted phases (in order of first appearance), the keys to draw.
        rl_axis: True: the RL phases end to end on a global step axis; False: the ``sft`` phase alone.
        stacked: One panel with the keys stacked (parts of a whole, e.g. a step's time), not a panel per key.
    """

    name: str
    title: str
    keys: Callable[[Sequence[str]], list[str]]
    rl_axis: bool = True
    stacked: bool = False


def _reward_keys(present: Sequence[str]) -> list[str]:
    components = sorted(k for k in present if k.startswith("reward/") and k not in ("reward/mean", "reward/std"))
    return (["reward/mean"] if "reward/mean" in present else []) + components


def _exact(*names: str) -> Callable[[Sequence[str]], list[str]]:
    return lambda present: [n for n in names if n in present]


# the parts of an RL step, as the trainer times them (``grpo.timing``)
STEP_PARTS = ("time/generate", "time/score", "time/logprobs", "time/advantages", "time/update", "time/sync",
              "time/sync_check")

PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reward", "Reward (mean and components)", _reward_keys),
    PlotSpec("accuracy", "Accuracy", _exact("reward/accuracy", "accuracy")),
    PlotSpec("kl", "KL to the reference", _exact("kl")),
    PlotSpec("completion_length", "Completion length (tokens)", _exact("completion/length_mean")),
    PlotSpec("mismatch", "Rollout-training mismatch (engine vs trainer log-probs and MoE routing)",
             _exact("mismatch/logp_abs_mean", "mismatch/kl", "mismatch/corrected_frac",
                    "mismatch/routing_disagreement")),
    PlotSpec("step_time", "Step time by part (seconds)", _exact(*STEP_PARTS), stacked=True),
    PlotSpec("sft_loss", "SFT loss", _exact("loss"), rl_axis=False),
)


@dataclass(frozen=True)
class _Axis:
    """The phases drawn on one x axis; a point of ``phase`` at ``step`` sits at ``x = step + shift[phase]``."""

    phases: tuple[str, ...]
    shift: dict[str, int]
    boundaries: tuple[float, ...]
    label: str

    def x(self, phase: str, step: int) -> int:
        return step + self.shift[phase]


def _phase_order(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["phase"] for r in records))


def _rl_axis(records: Sequence[Mapping[str, Any]]) -> _Axis:
    phases = [p for p in _phase_order(records) if p not in NON_RL_PHASES]
    shift, boundaries, offset = {}, [], 0
    for phase in phases:
        steps = [r["step"] for r in records if r["phase"] == phase]
        shift[phase] = offset - min(steps) + 1
        offset += max(steps) - min(steps) + 1
        boundaries.append(offset + 0.5)
    return _Axis(tuple(phases), shift, tuple(boundaries[:-1]), "global RL step")


def _series(records: Iterable[Mapping[str, Any]], phase: str, key: str) -> tuple[list[int], list[float]]:
    """Steps (ascending) and values (NaN for null) of ``key`` in ``phase``; a repeated step keeps its last value."""
    by_step = {r["step"]: r[key] for r in records if r["phase"] == phase and key in r}
    steps = sorted(by_step)
    return steps, [math.nan if by_step[s] is None else float(by_step[s]) for s in steps]


def _present_keys(records: Sequence[Mapping[str, Any]], phases: Sequence[str]) -> list[str]:
    """Keys with at least one non-null value in ``phases``, in order of first appearance."""
    keys: dict[str, None] = {}
    for r in records:
        if r["phase"] in phases:
            keys.update((k, None) for k, v in r.items() if k not in RESERVED_KEYS and v is not None)
    return list(keys)


def _figure(panels: int) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 1.0 + 2.4 * panels), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _render_stacked(spec: PlotSpec, records: Sequence[Mapping[str, Any]], axis: _Axis, keys: list[str]) -> bytes:
    """The keys stacked over the axis' phases end to end (a missing value counts 0)."""
    fig = _figure(1)
    ax = fig.subplots()
    xs, stacks = [], {k: [] for k in keys}
    for phase in axis.phases:
        by_step = {r["step"]: r for r in records if r["phase"] == phase}
        for step in sorted(by_step):
            xs.append(axis.x(phase, step))
            for k in keys:
                stacks[k].append(float(by_step[step].get(k) or 0.0))
    ax.stackplot(xs, *stacks.values(), labels=[k.removeprefix("time/") for k in keys], alpha=0.85)
    for b in axis.boundaries:
        ax.axvline(b, color="0.3", linestyle="--", linewidth=1)
    ax.set_ylabel("seconds")
    ax.set_xlabel(axis.label)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small", ncol=len(keys), frameon=False)
    fig.suptitle(spec.title)
    return _png(fig)


def _render(spec: PlotSpec, records: Sequence[Mapping[str, Any]], axis: _Axis, keys: list[str],
            colors: Mapping[str, Any]) -> bytes:
    if spec.stacked:
        return _render_stacked(spec, records, axis, keys)
    fig = _figure(len(keys))
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        for phase in axis.phases:
            steps, values = _series(records, phase, key)
            if steps:
                ax.plot([axis.x(phase, s) for s in steps], values, marker="o" if len(steps) < 40 else None,
                        markersize=3, color=colors[phase], label=phase)
        for b in axis.boundaries:
            ax.axvline(b, color="0.5", linestyle="--", linewidth=1)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize="small")
    axes[-1].set_xlabel(axis.label)
    fig.suptitle(spec.title)
    return _png(fig)


def plot_metrics(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Draws the run's curves as PNGs (see :data:`PLOTS`); a plot whose keys were never logged is skipped.

    Args:
        run_dir: The run folder holding ``metrics.jsonl``.
        out_dir: Where the PNGs go (default ``run_dir/plots``).

    Returns:
        The paths written, in :data:`PLOTS` order.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / PLOTS_DIR
    order = _phase_order(records)
    colors = {p: f"C{i % 10}" for i, p in enumerate(order)}
    axes = {True: _rl_axis(records),
            False: _Axis((SFT,) if SFT in order else (), {SFT: 0}, (), "SFT step")}
    written = []
    for spec in PLOTS:
        axis = axes[spec.rl_axis]
        keys = spec.keys(_present_keys(records, axis.phases))
        if not keys:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{spec.name}.png"
        atomic_write_bytes(path, _render(spec, records, axis, keys, colors))
        written.append(path)
    return written


def bar_chart(path: Path, title: str, categories: list[str], series: Mapping[str, list[float | None]],
               ylim: tuple[float, float] | None = None, hline: float | None = None) -> None:
    """Grouped bars: one group per category, one bar per series, each labelled with its value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = 0.8 / max(len(series), 1)
    fig = Figure(figsize=(max(4.0, 0.5 + 0.45 * len(categories) * (len(series) + 1)), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for j, (label, values) in enumerate(series.items()):
        xs = [i + j * width for i, v in enumerate(values) if v is not None]
        bars = ax.bar(xs, [v for v in values if v is not None], width=width, label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize="x-small")
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(categories))], categories, rotation=20)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=0.8)
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
