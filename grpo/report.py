"""Run logging and reports: a crash-safe metrics log, TensorBoard scalars, plots and the end-of-run report.

A run folder ``runs/<name>/`` collects:

* ``metrics.jsonl``: one JSON object per :meth:`MetricsLogger.log` call, ``{"phase", "step", "time", **metrics}``.
  Every line is flushed and fsynced before ``log`` returns, so a crash loses nothing already logged; a line is
  complete only once its newline is written, and an incomplete last line (a writer killed mid-write) is ignored
  by :func:`read_metrics` with a warning and cut off when a :class:`MetricsLogger` reopens the file.
  Non-finite values are written as ``null``.
* ``tensorboard/<phase>/``: scalars tagged ``"{phase}/{metric}"``, one TensorBoard run per phase. Keeping phases
  apart lets a resumed phase purge its own stale events: after :meth:`MetricsLogger.truncate_after` the phase's
  next writer starts with ``purge_step = step + 1``, so TensorBoard hides the events a crashed attempt wrote past
  the checkpoint, as :meth:`truncate_after` does for the JSON lines.
* ``plots/*.png`` (:func:`plot_metrics`) and ``report.md`` / ``report.json`` (:func:`write_report`), both written
  atomically (temporary file in the same folder, then ``os.replace``).

Plots put the RL phases (every phase but ``sft``, ``rm`` and ``eval``) end to end on one global step axis in the
order they first appear in the log; phase ``p`` covers ``offset_p + 1 .. offset_p + (max_step - min_step + 1)``
and dashed lines mark the boundaries. When a phase logs the same step twice, the last value wins.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import math
import numbers
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOTS_DIR = "plots"
RESERVED_KEYS = ("phase", "step", "time")
NON_RL_PHASES = frozenset({"sft", "rm", "eval"})


# ------------------------------------------------------------------------------------------------ files
def _atomic_write(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _split_lines(path: Path) -> tuple[list[str], str]:
    """The complete lines of ``path`` (newline kept) and the incomplete tail after the last newline."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        return lines[:-1], lines[-1]
    return lines, ""


def _parse_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}): {line[:80]!r}") from exc
    if not isinstance(record, dict) or not isinstance(record.get("phase"), str) or \
            isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
        raise ValueError(f"{path}:{lineno}: expected an object with a string 'phase' and an integer 'step', "
                         f"got {line[:80]!r}")
    return record


def _warn_partial(path: Path, tail: str) -> None:
    warnings.warn(f"{path}: ignoring an incomplete last line ({len(tail)} characters) left by an interrupted "
                  f"writer", RuntimeWarning, stacklevel=3)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Reads ``run_dir/metrics.jsonl`` in the order written.

    Args:
        run_dir: The run folder.

    Returns:
        One dict per logged line, ``{"phase", "step", "time", **metrics}``; non-finite metrics are ``None``.
        An empty list when nothing was logged yet.

    Raises:
        FileNotFoundError: if ``run_dir`` does not exist.
        ValueError: naming the file and line of a complete line that is not a metrics record.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r} is not a folder")
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    lines, tail = _split_lines(path)
    if tail.strip():
        _warn_partial(path, tail)
    return [_parse_line(path, i, line) for i, line in enumerate(lines, 1) if line.strip()]


# ------------------------------------------------------------------------------------------------ logger
@functools.cache
def _summary_writer_class() -> type | None:
    """``torch.utils.tensorboard.SummaryWriter``, or None (after one warning) when it cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.warning("TensorBoard logging disabled: cannot import torch.utils.tensorboard (%s); "
                    "install the 'tensorboard' package", exc)
        return None
    return SummaryWriter


def _check_phase(phase: Any) -> str:
    if not isinstance(phase, str) or not phase.strip() or "/" in phase or "\\" in phase:
        raise ValueError(f"phase: expected a non-empty name without '/' or '\\', got {phase!r}")
    return phase


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    return int(step)


def _metric_value(key: str, value: Any) -> float | None:
    """A metric as a finite float, or None for None / NaN / inf; one-element tensors are unwrapped."""
    if value is not None and not isinstance(value, numbers.Real) and callable(getattr(value, "item", None)):
        value = value.item()
    if value is None:
        return None
    if not isinstance(value, numbers.Real):
        raise TypeError(f"metrics[{key!r}]: expected a number or None, got {type(value).__name__} {value!r}")
    value = float(value)
    return value if math.isfinite(value) else None


def _check_metrics(metrics: Any) -> dict[str, float | None]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics: expected a mapping of name -> number, got {type(metrics).__name__}")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metrics: keys must be non-empty strings, got {key!r}")
        if key in RESERVED_KEYS:
            raise ValueError(f"metrics: key {key!r} is reserved (the line already holds {list(RESERVED_KEYS)})")
        out[key] = _metric_value(key, value)
    return out


class MetricsLogger:
    """Appends metrics to ``run_dir/metrics.jsonl`` (crash-safe) and to TensorBoard.

    One logger writes a run folder at a time. Reopening a folder appends to it; a resumed phase calls
    :meth:`truncate_after` with its checkpoint's step first, so the log equals that of an uninterrupted run.

    Example:
        >>> with MetricsLogger(run_dir) as logger:  # doctest: +SKIP
        ...     logger.log("rl_reason", 1, {"reward/mean": 0.25, "kl": 0.0})

    Args:
        run_dir: The run folder (created when missing).
        tensorboard: Also write TensorBoard scalars under ``run_dir/tensorboard/<phase>/``. When
            ``torch.utils.tensorboard`` cannot be imported, one warning is logged and only the JSON log is kept.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._writer_cls = _summary_writer_class() if tensorboard else None
        self._writers: dict[str, Any] = {}
        self._purge_step: dict[str, int] = {}
        self._drop_partial_tail()
        self._file: io.TextIOWrapper | None = open(self.path, "a", encoding="utf-8")

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard scalars are written."""
        return self._writer_cls is not None

    def _drop_partial_tail(self) -> None:
        if not self.path.exists():
            return
        lines, tail = _split_lines(self.path)
        if tail:
            _warn_partial(self.path, tail)
            _atomic_write(self.path, "".join(lines).encode("utf-8"))

    def _open_file(self) -> io.TextIOWrapper:
        if self._file is None:
            raise ValueError(f"MetricsLogger for {str(self.run_dir)!r} is closed")
        return self._file

    def log(self, phase: str, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends ``{"phase", "step", "time", **metrics}`` as one line and writes TensorBoard scalars.

        Args:
            phase: Phase name (``sft``, ``rl_reason``, ...).
            step: The phase's step (>= 0).
            metrics: Name -> number (floats, ints, one-element tensors) or None; non-finite values become
                ``null`` in the file and are left out of TensorBoard.

        Raises:
            ValueError / TypeError: naming the bad argument or metric.
        """
        f = self._open_file()
        phase, step, values = _check_phase(phase), _check_step(step), _check_metrics(metrics)
        record = {"phase": phase, "step": step, "time": time.time(), **values}
        f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
        if self._writer_cls is not None:
            writer = self._writer(phase)
            for key, value in values.items():
                if value is not None:
                    writer.add_scalar(f"{phase}/{key}", value, global_step=step)
            writer.flush()

    def _writer(self, phase: str) -> Any:
        if phase not in self._writers:
            self._writers[phase] = self._writer_cls(log_dir=str(self.run_dir / TENSORBOARD_DIR / phase),
                                                    purge_step=self._purge_step.pop(phase, None))
        return self._writers[phase]

    def truncate_after(self, phase: str, step: int) -> int:
        """Drops the lines of ``phase`` whose step is greater than ``step`` (call when resuming from ``step``).

        The file is rewritten atomically. TensorBoard events of the phase past ``step`` are purged by its next
        writer (``purge_step = step + 1``).

        Returns:
            The number of lines dropped.
        """
        f = self._open_file()
        phase, step = _check_phase(phase), _check_step(step)
        f.close()
        self._file = None
        lines, _ = _split_lines(self.path)
        keep = [line for i, line in enumerate(lines, 1)
                if not line.strip() or not _drops(_parse_line(self.path, i, line), phase, step)]
        _atomic_write(self.path, "".join(keep).encode("utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")
        if phase in self._writers:
            self._writers.pop(phase).close()
        self._purge_step[phase] = step + 1
        return len(lines) - len(keep)

    def close(self) -> None:
        """Closes the file and the TensorBoard writers; closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drops(record: Mapping[str, Any], phase: str, step: int) -> bool:
    return record["phase"] == phase and record["step"] > step


# ------------------------------------------------------------------------------------------------ plots
@dataclass(frozen=True)
class PlotSpec:
    """One PNG: a panel per selected metric key, with one line per phase.

    Attributes:
        name: File stem in the plots folder.
        title: Figure title.
        keys: Given the keys present in the plotted phases (in order of first appearance), the keys to draw.
        rl_axis: True: the RL phases end to end on a global step axis; False: the ``sft`` phase alone.
    """

    name: str
    title: str
    keys: Callable[[Sequence[str]], list[str]]
    rl_axis: bool = True


def _reward_keys(present: Sequence[str]) -> list[str]:
    components = sorted(k for k in present if k.startswith("reward/") and k not in ("reward/mean", "reward/std"))
    return (["reward/mean"] if "reward/mean" in present else []) + components


def _exact(*names: str) -> Callable[[Sequence[str]], list[str]]:
    return lambda present: [n for n in names if n in present]


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reward", "Reward (mean and components)", _reward_keys),
    PlotSpec("accuracy", "Accuracy", _exact("reward/accuracy", "accuracy")),
    PlotSpec("kl", "KL to the reference", _exact("kl")),
    PlotSpec("completion_length", "Completion length (tokens)", _exact("completion/length_mean")),
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


def _render(spec: PlotSpec, records: Sequence[Mapping[str, Any]], axis: _Axis, keys: list[str],
            colors: Mapping[str, Any]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 1.0 + 2.4 * len(keys)), layout="constrained")
    FigureCanvasAgg(fig)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


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
            False: _Axis(("sft",) if "sft" in order else (), {"sft": 0}, (), "SFT step")}
    written = []
    for spec in PLOTS:
        axis = axes[spec.rl_axis]
        keys = spec.keys(_present_keys(records, axis.phases))
        if not keys:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{spec.name}.png"
        _atomic_write(path, _render(spec, records, axis, keys, colors))
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------ report
def _optional_number(where: str, value: Any, low: float | None = None, high: float | None = None
                     ) -> float | None:
    """``value`` as a float; None / NaN mean "not measured"; out of ``[low, high]`` is an error."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: expected a number or None, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value):
        return None
    if (low is not None and value < low) or (high is not None and value > high) or math.isinf(value):
        bounds = [f" >= {low}"] * (low is not None) + [f" <= {high}"] * (high is not None)
        raise ValueError(f"{where}: expected a finite number{' and'.join(bounds)}, got {value}")
    return value


@dataclass(frozen=True)
class PhaseEval:
    """The held-out evaluation after one phase (None: not measured).

    Attributes:
        accuracy: Share of correct answers, in [0, 1].
        rewards: Reward name -> mean over the held-out set.
        format_rate: Share of well-formatted completions, in [0, 1].
        length_mean: Mean completion length in tokens.
        n: Number of held-out prompts.
        extra: Other numbers the evaluation reported (``pass@k``, ``maj@k``, ...).
    """

    accuracy: float | None
    rewards: dict[str, float | None]
    format_rate: float | None = None
    length_mean: float | None = None
    n: int | None = None
    extra: dict[str, float | None] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_mapping(cls, phase: str, data: Any) -> PhaseEval:
        """Validates ``evals[phase]``; errors name the field, e.g. ``evals['sft']['accuracy']``."""
        where = f"evals[{phase!r}]"
        if not isinstance(data, Mapping):
            raise TypeError(f"{where}: expected a mapping with 'accuracy' and 'rewards', got {type(data).__name__}")
        missing = [k for k in ("accuracy", "rewards") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing {missing} (expected 'accuracy' in [0, 1] and 'rewards': "
                             f"{{name: mean}})")
        if not isinstance(data["rewards"], Mapping):
            raise TypeError(f"{where}['rewards']: expected a mapping name -> mean, got {data['rewards']!r}")
        n = data.get("n")
        if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
            raise ValueError(f"{where}['n']: expected an integer >= 0, got {n!r}")
        known = {"accuracy", "rewards", "format_rate", "length_mean", "n"}
        return cls(
            accuracy=_optional_number(f"{where}['accuracy']", data["accuracy"], 0.0, 1.0),
            rewards={str(k): _optional_number(f"{where}['rewards'][{k!r}]", v) for k, v in data["rewards"].items()},
            format_rate=_optional_number(f"{where}['format_rate']", data.get("format_rate"), 0.0, 1.0),
            length_mean=_optional_number(f"{where}['length_mean']", data.get("length_mean"), 0.0),
            n=None if n is None else int(n),
            extra={str(k): _optional_number(f"{where}[{k!r}]", v) for k, v in data.items()
                   if k not in known and (v is None or isinstance(v, numbers.Real))},
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"accuracy": self.accuracy, "rewards": dict(self.rewards)}
        optional = {"format_rate": self.format_rate, "length_mean": self.length_mean, "n": self.n}
        out.update({k: v for k, v in optional.items() if v is not None})
        out.update(self.extra)
        return out


def _diff(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    """``scale * (b - a)`` rounded to 9 decimals (drops float noise like ``15.000000000000002``), or None when
    either is missing."""
    return None if a is None or b is None else round(scale * (b - a), 9)


def _baseline(phases: Sequence[str], target: str, preferred: str) -> str | None:
    """``preferred`` when it was evaluated before ``target``, else the phase evaluated just before it."""
    if target not in phases:
        return None
    before = phases[:phases.index(target)]
    return preferred if preferred in before else (before[-1] if before else None)


PREFERENCE_TOTAL = "preference"  # the weighted stage-2 reward itself, when an evaluation reports it
ON_STAGE2_PROMPTS = " (stage-2 prompts)"  # a stage-2 component sharing a held-out metric's name (``accuracy``)
SAMPLED = " (sampled)"  # a preference reward averaged over sampled completions


def _preference_names(recipe: Mapping[str, Any] | None) -> list[str]:
    """The preference total and components, over greedy then sampled completions (``NAME (sampled)``)."""
    specs = ((recipe or {}).get("rl_pref") or {}).get("rewards") or []
    names = [s.get("key") or s.get("name") for s in specs if isinstance(s, Mapping)]
    names = [PREFERENCE_TOTAL, *names] if names else names
    return [*names, *(n + SAMPLED for n in names)]


def compute_deltas(evals: Mapping[str, PhaseEval], recipe: Mapping[str, Any] | None = None
                   ) -> tuple[dict[str, Any], float | None]:
    """The deltas that matter and the alignment tax.

    * ``stage1_accuracy_gain_points``: ``100 * (acc[rl_reason] - acc[sft])`` (the phase evaluated before
      ``rl_reason`` stands in for ``sft`` when SFT was not evaluated).
    * ``stage2_reward_change``: ``rewards[rl_pref] - rewards[baseline]`` for each reward both report, baseline
      ``rl_reason`` (or the phase before ``rl_pref``); ``preference`` lists the rewards ``rl_pref`` trained on
      (from the recipe; all shared rewards without one).
    * alignment tax: ``100 * (acc[rl_reason] - acc[rl_pref])``, accuracy points lost in stage 2 (negative: a gain).

    Returns:
        ``(deltas, alignment_tax)``; a delta whose phases were not evaluated is None, a value that cannot be
        computed (a missing number) is None inside it.
    """
    phases = list(evals)
    deltas: dict[str, Any] = {"stage1_accuracy_gain_points": None, "stage2_reward_change": None}
    base1 = _baseline(phases, "rl_reason", "sft")
    if base1 is not None:
        deltas["stage1_accuracy_gain_points"] = {
            "from": base1, "to": "rl_reason",
            "value": _diff(evals[base1].accuracy, evals["rl_reason"].accuracy, 100.0)}
    base2 = _baseline(phases, "rl_pref", "rl_reason")
    if base2 is not None:
        before, after = evals[base2].rewards, evals["rl_pref"].rewards
        shared = [k for k in after if k in before]
        # a component named like a held-out metric is evaluated on the stage-2 prompts under its own name
        names = [k + ON_STAGE2_PROMPTS if k + ON_STAGE2_PROMPTS in shared else k for k in _preference_names(recipe)]
        wanted = [k for k in names if k in shared]
        deltas["stage2_reward_change"] = {
            "from": base2, "to": "rl_pref", "values": {k: _diff(before[k], after[k]) for k in shared},
            "preference": wanted or shared}
    tax = None
    if "rl_reason" in evals and "rl_pref" in evals:
        tax = _diff(evals["rl_pref"].accuracy, evals["rl_reason"].accuracy, 100.0)
    return deltas, tax


RECIPE_SETTINGS = (
    "name", "seed", "phases", "model.preset", "model.path", "model.dtype",
    "sft.train.lr", "sft.train.epochs", "sft.train.batch_size",
    *(f"{p}.{k}" for p in ("rl_reason", "rl_pref") for k in (
        "steps", "rewards", "reward_mode", "grpo.group_size", "grpo.prompts_per_step", "grpo.lr", "grpo.lr_schedule",
        "grpo.beta", "grpo.weight_decay", "grpo.kl", "grpo.clip_low", "grpo.clip_high", "grpo.loss_agg",
        "grpo.advantage", "grpo.temperature", "grpo.max_new_tokens")),
)


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def recipe_settings(recipe: Any) -> dict[str, Any]:
    """The :data:`RECIPE_SETTINGS` present in ``recipe`` (a mapping or a recipe dataclass), in that order.

    Sections of phases the recipe does not run are left out; reward lists read ``name x weight`` and other lists
    are joined with commas.
    """
    if dataclasses.is_dataclass(recipe) and not isinstance(recipe, type):
        recipe = dataclasses.asdict(recipe)
    if not isinstance(recipe, Mapping):
        raise TypeError(f"recipe: expected a mapping (or a recipe dataclass), got {type(recipe).__name__}")
    phases = recipe.get("phases")
    out = {}
    for key in RECIPE_SETTINGS:
        section = key.split(".")[0]
        if isinstance(phases, (list, tuple)) and section in ("sft", "rl_reason", "rl_pref") and section not in phases:
            continue
        value = _lookup(recipe, key)
        if value is None:
            continue
        if key.endswith(".rewards") and isinstance(value, list):
            value = " + ".join(f"{r.get('key') or r.get('name')} x {r.get('weight', 1.0):g}"
                               for r in value if isinstance(r, Mapping))
        elif isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        out[key] = value
    return out


# recipe keys whose value the report takes from what the run logged: (phase, logged metric, recipe key)
RAN_SETTINGS = (
    ("sft", "lr", "sft.train.lr"),
    *((p, k, f"{p}.grpo.{k}") for p in ("rl_reason", "rl_pref") for k in ("lr", "beta", "temperature",
                                                                          "weight_decay")),
)


def _ran_value(values: Sequence[float]) -> str:
    """One logged setting over a phase: the value, or its range and last value when it changed (a schedule)."""
    first, last, top = values[0], values[-1], max(values)
    if all(v == first for v in values):
        return f"{first:g}"
    return f"{first:g} .. {top:g} -> {last:g} (first, peak and last of {len(values)} logged steps)"


def ran_settings(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The settings as the run logged them (:data:`RAN_SETTINGS`), for the report's recipe table: what ran."""
    out = {}
    for phase, metric, key in RAN_SETTINGS:
        values = [float(r[metric]) for r in records if r.get("phase") == phase and r.get(metric) is not None]
        if values:
            out[key] = _ran_value(values)
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _table(evals: Mapping[str, PhaseEval]) -> list[str]:
    """Markdown table: a row per phase; accuracy, the optional numbers any phase reported and each reward's mean."""
    def pct(value: float | None) -> str:
        return _fmt(None if value is None else 100 * value, ".1f", "%")

    optional: list[tuple[str, Callable[[PhaseEval], str]]] = [
        ("format rate", lambda e: pct(e.format_rate)),
        ("length", lambda e: _fmt(e.length_mean, ".4g")),
        ("n", lambda e: _fmt(e.n, "d")),
    ]
    optional += [(k, lambda e, k=k: _fmt(e.extra.get(k), ".4g"))
                 for k in dict.fromkeys(k for e in evals.values() for k in e.extra)]
    columns = [("accuracy", lambda e: pct(e.accuracy))]
    columns += [(name, cell) for name, cell in optional if any(cell(e) != "n/a" for e in evals.values())]
    columns += [(f"reward: {k}", lambda e, k=k: _fmt(e.rewards.get(k), ".3f"))
                for k in dict.fromkeys(k for e in evals.values() for k in e.rewards)]
    rows = ["| phase | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    rows += [f"| {phase} | " + " | ".join(cell(e) for _, cell in columns) + " |" for phase, e in evals.items()]
    return rows


def _delta_lines(deltas: Mapping[str, Any], tax: float | None, phases: Sequence[str]) -> list[str]:
    lines = []
    s1 = deltas["stage1_accuracy_gain_points"]
    if s1 is not None:
        lines.append(f"- Stage 1 accuracy gain ({s1['from']} -> {s1['to']}): {_fmt(s1['value'], '+.1f', ' points')}")
    s2 = deltas["stage2_reward_change"]
    if s2 is not None:
        changes = ", ".join(f"{k} {_fmt(s2['values'][k], '+.3f')}" for k in s2["preference"]) or "n/a"
        lines.append(f"- Stage 2 preference reward change ({s2['from']} -> {s2['to']}): {changes}")
    if "rl_reason" in phases and "rl_pref" in phases:
        lines.append(f"- Alignment tax (accuracy lost from rl_reason to rl_pref): {_fmt(tax, '+.1f', ' points')}")
    return lines


def _markdown(run_dir: Path, evals: Mapping[str, PhaseEval], deltas: Mapping[str, Any], tax: float | None,
              plots: Sequence[Path], settings: Mapping[str, Any], notes: Sequence[str]) -> str:
    out = [f"# Run report: {run_dir.resolve().name}", ""]
    if evals:
        out += ["## Held-out evaluation after each phase", "", *_table(evals), ""]
        delta_lines = _delta_lines(deltas, tax, list(evals))
        if delta_lines:
            out += ["## Deltas", "", *delta_lines, ""]
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


def write_report(run_dir: str | Path, evals: Mapping[str, Mapping[str, Any]], *,
                 recipe: Mapping[str, Any] | None = None, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Writes ``run_dir/report.md`` and ``run_dir/report.json`` (atomically), regenerating the plots first.

    Args:
        run_dir: The run folder.
        evals: Phase name (``base``, ``sft``, ``rl_reason``, ``rl_pref``, ...) in run order -> its held-out
            evaluation: ``accuracy`` (0..1) and ``rewards`` ``{name: mean}`` required, ``format_rate``,
            ``length_mean``, ``n`` and other numbers (``pass@k``) optional; None or NaN means not measured.
        recipe: The run's recipe as plain data; its key settings are listed and ``rl_pref.rewards`` names the
            preference rewards.
        notes: Free-form lines appended to the report.

    Returns:
        ``(report.md, report.json)``. The JSON holds ``phases``, ``deltas`` (see :func:`compute_deltas`),
        ``alignment_tax`` (accuracy points), ``plots``, ``settings`` and ``notes``; missing numbers are null.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir {str(run_dir)!r} is not a folder")
    if not isinstance(evals, Mapping):
        raise TypeError(f"evals: expected a mapping phase -> evaluation, got {type(evals).__name__}")
    if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
        raise TypeError(f"notes: expected a list of strings, got {notes!r}")
    parsed = {str(phase): PhaseEval.from_mapping(str(phase), data) for phase, data in evals.items()}
    settings = recipe_settings(recipe) if recipe is not None else {}
    if (run_dir / METRICS_FILE).exists():
        settings.update(ran_settings(read_metrics(run_dir)))  # what ran, as logged, over what was asked for
    recipe_data = dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe) else recipe
    deltas, tax = compute_deltas(parsed, recipe_data)
    plots = plot_metrics(run_dir) if (run_dir / METRICS_FILE).exists() else []
    report = {
        "phases": {p: e.to_json() for p, e in parsed.items()},
        "deltas": deltas,
        "alignment_tax": tax,
        "plots": [Path(os.path.relpath(p, run_dir)).as_posix() for p in plots],
        "settings": settings,
        "notes": list(notes),
    }
    md_path, json_path = run_dir / "report.md", run_dir / "report.json"
    _atomic_write(json_path, (json.dumps(report, indent=2, allow_nan=False, default=str) + "\n").encode("utf-8"))
    _atomic_write(md_path, _markdown(run_dir, parsed, deltas, tax, plots, settings, notes).encode("utf-8"))
    return md_path, json_path
