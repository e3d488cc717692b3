"""The run's metrics log: ``metrics.jsonl`` (crash-safe), and the same scalars to the run's trackers
(TensorBoard by default; W&B and MLflow, see :mod:`grpo.reporting.trackers`).

* ``metrics.jsonl``: one JSON object per :meth:`MetricsLogger.log` call, ``{"phase", "step", "time", **metrics}``.
  Every line is flushed and fsynced before ``log`` returns, so a crash loses nothing already logged; a line is
  complete only once its newline is written, and an incomplete last line (a writer killed mid-write) is ignored
  by :func:`read_metrics` with a warning and cut off when a :class:`MetricsLogger` reopens the file.
  Non-finite values are written as ``null``.
* trackers: the finite scalars of every line, tagged ``"{phase}/{metric}"``. TensorBoard keeps one run per
  phase, so a resumed phase purges its own stale events: after :meth:`MetricsLogger.truncate_after` the phase's
  next writer starts with ``purge_step = step + 1``, so TensorBoard hides the events a crashed attempt wrote past
  the checkpoint, as :meth:`truncate_after` does for the JSON lines.
"""

from __future__ import annotations

import io
import json
import logging
import math
import numbers
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from grpo.reporting.trackers import TensorBoardTracker, Tracker, build_trackers
from model.files import atomic_write_bytes

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RESERVED_KEYS = ("phase", "step", "time")


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
        trackers: More trackers that get every line's scalars (W&B, MLflow: :func:`build_trackers`).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, trackers: Sequence[Tracker] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.trackers = [*(build_trackers(["tensorboard"], self.run_dir, "", {}) if tensorboard else []), *trackers]
        self._drop_partial_tail()
        self._file: io.TextIOWrapper | None = open(self.path, "a", encoding="utf-8")

    @property
    def tensorboard(self) -> bool:
        """Whether TensorBoard scalars are written."""
        return any(isinstance(t, TensorBoardTracker) for t in self.trackers)

    def _drop_partial_tail(self) -> None:
        if not self.path.exists():
            return
        lines, tail = _split_lines(self.path)
        if tail:
            _warn_partial(self.path, tail)
            atomic_write_bytes(self.path, "".join(lines).encode("utf-8"))

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
        finite = {k: v for k, v in values.items() if v is not None}
        for tracker in self.trackers:
            tracker.log(phase, step, finite)

    def artifact(self, paths: Sequence[Path]) -> None:
        """Attaches files of the run folder (the report) to every tracker that keeps artifacts."""
        for tracker in self.trackers:
            tracker.artifact(paths, self.run_dir)

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
        atomic_write_bytes(self.path, "".join(keep).encode("utf-8"))
        self._file = open(self.path, "a", encoding="utf-8")
        for tracker in self.trackers:
            tracker.truncate_after(phase, step)
        return len(lines) - len(keep)

    def close(self) -> None:
        """Closes the file and the trackers; closing twice is harmless."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drops(record: Mapping[str, Any], phase: str, step: int) -> bool:
    return record["phase"] == phase and record["step"] > step
