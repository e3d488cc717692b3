"""What a run shows on the terminal, and where everything else goes.

The driver draws one progress display per phase (:class:`PhaseProgress`), fed by the metrics the workers
report, never by forwarding their own output. On a terminal it is a bar with the step, the ETA and the numbers
that matter (reward, KL and tokens/s for RL; loss and lr for SFT); when the output is not a terminal (piped to a
file, a CI log) it is one plain line per logged step.

Everything else a run prints goes to its log folder ``runs/<name>/logs/`` (:class:`RunOutput`): the driver's
own stdout and stderr (Ray's banner and notices, third-party warnings and bars) to ``driver.log``, each worker's
to ``<Role>-<pid>.log`` (:func:`capture_worker_output`, which the workers call as they start; the folder reaches
them through the ``GRPO_LOG_DIR`` environment variable of the Ray job's ``runtime_env``, set by
:func:`grpo.orchestration.controller.init_ray`). Our own warnings are shown on the terminal too. With
``verbose`` nothing is redirected: the workers' output is forwarded by Ray as it comes, as before.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

LOG_DIR_ENV = "GRPO_LOG_DIR"
OUR_PACKAGES = ("grpo", "model", "rollout", "rewards", "sft", "grpo_kernels")
# what a phase's display shows, in order: (metric key, label, format)
SHOWN: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sft": (("loss", "loss", ".4f"), ("lr", "lr", ".2e"), ("tokens_per_s", "tok/s", ".0f")),
    "rl": (("reward/mean", "reward", ".3f"), ("kl", "kl", ".4f"), ("tokens_per_s", "tok/s", ".0f")),
    "rm": (("loss", "loss", ".4f"),),
}


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _columns(stream: IO[str]) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


def format_values(kind: str, metrics: Mapping[str, Any]) -> str:
    """The shown metrics of a step as ``label value`` pairs, e.g. ``reward 0.512  kl 0.0012``."""
    parts = []
    for key, label, fmt in SHOWN.get(kind, ()):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{label} {value:{fmt}}")
    return "  ".join(parts)


class PhaseProgress:
    """One phase's progress: a bar on a terminal, else one line per :meth:`update`.

    Args:
        stream: Where to draw (the terminal, or a file/pipe).
        name: What the display is labelled with (``sft``, ``rl_reason``, ``rm helpful``).
        kind: Which metrics to show (a key of :data:`SHOWN`).
        total: Steps in the phase (``None`` until known; :meth:`update` may set it).
        initial: Steps already done (a resumed phase).
    """

    def __init__(self, stream: IO[str], name: str, kind: str, total: int | None = None, initial: int = 0) -> None:
        self.stream, self.name, self.kind = stream, name, kind
        self.total, self.step = total, initial
        self._first: tuple[float, int] | None = None  # (time, step) of the first update: the pace counts from it
        self.bar = None
        if stream.isatty():
            # a terminal that reports no size (0 columns) gets a fixed-width bar instead of an empty one
            sized = _columns(stream) > 0
            self.bar = tqdm(total=total, initial=initial, desc=name, file=stream, dynamic_ncols=sized,
                            ncols=None if sized else 100, leave=True, unit="step")

    def eta(self) -> float | None:
        """Seconds left at the pace of the steps since the first update (start-up excluded), or None before
        two updates."""
        if self._first is None or self.total is None or self.step == self._first[1]:
            return None
        seconds, done = time.perf_counter() - self._first[0], self.step - self._first[1]
        return seconds / done * max(0, self.total - self.step)

    def update(self, step: int, metrics: Mapping[str, Any], total: int | None = None) -> None:
        """Moves to ``step`` (1-based, the number of steps done) with that step's metrics."""
        if total is not None and total != self.total:
            self.total = total
            if self.bar is not None:
                self.bar.total = total
        moved, self.step = step - self.step, step
        if self._first is None:
            self._first = (time.perf_counter(), step)
        values = format_values(self.kind, metrics)
        if self.bar is not None:
            self.bar.set_postfix_str(values, refresh=False)
            self.bar.update(moved)
            return
        eta = self.eta()
        of = f"/{self.total}" if self.total is not None else ""
        tail = f"  eta {_duration(eta)}" if eta is not None and step < (self.total or 0) else ""
        self.stream.write(f"[grpo] {self.name} {step}{of}  {values}{tail}".rstrip() + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """The phase completed: a bar moves to its total (the last steps may not have been logged)."""
        if self.bar is not None and self.total is not None and self.step < self.total:
            self.bar.update(self.total - self.step)
            self.step = self.total

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _TerminalHandler(logging.Handler):
    """Our packages' warnings and errors, written on the terminal (between progress bars)."""

    def __init__(self, console: Console) -> None:
        super().__init__(logging.WARNING)
        self.console = console
        self.addFilter(lambda record: record.name.split(".")[0] in OUR_PACKAGES)

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(f"{record.levelname.lower()}: {record.getMessage()}")


class Console:
    """The terminal side of a run: ``[grpo]`` lines and phase displays, kept apart from progress bars.

    Args:
        stream: The terminal (the original stdout, kept by :class:`RunOutput` when the rest is redirected).
    """

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def print(self, message: str) -> None:
        """Writes ``[grpo] message`` as its own line (above a bar that is being drawn)."""
        tqdm.write(f"[grpo] {message}", file=self.stream)
        self.stream.flush()

    def phase(self, name: str, kind: str, total: int | None = None, initial: int = 0) -> PhaseProgress:
        """A progress display for a phase (see :class:`PhaseProgress`)."""
        return PhaseProgress(self.stream, name, kind, total, initial)


class RunOutput:
    """While a run lasts, sends the driver's stdout and stderr to ``logs/driver.log``; the :attr:`console`
    keeps writing to the terminal.

    Args:
        run_dir: The run folder (``logs/`` is created in it).
        verbose: Redirect nothing; Ray forwards the workers' output as usual.
    """

    def __init__(self, run_dir: Path, verbose: bool = False) -> None:
        self.folder = run_dir / "logs"
        self.verbose = verbose
        self.console = Console()
        self._saved: list[int] = []
        self._handler: logging.Handler | None = None

    def __enter__(self) -> RunOutput:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.verbose:
            return self
        self._saved = [os.dup(1), os.dup(2)]
        terminal = os.fdopen(os.dup(self._saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.console = Console(terminal)
        _redirect_output(self.folder / "driver.log")
        _quiet_libraries()
        self._handler = _TerminalHandler(self.console)
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._saved:
            return
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = []
        self.console.stream.close()
        self.console = Console()


def _redirect_output(path: Path) -> None:
    """Points this process's stdout and stderr (file descriptors 1 and 2, so C-level writes too) at ``path``,
    appending."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _quiet_libraries() -> None:
    """Routes transformers' messages through Python logging (so they land in the log file, not the terminal)
    and lets Python warnings go the same way."""
    logging.captureWarnings(True)
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def capture_worker_output(role: str) -> Path | None:
    """In a worker process of a run: sends its stdout and stderr (C level included) to
    ``logs/<role>-<pid>.log`` in the run's log folder; returns the file, or None outside a quiet run."""
    folder = os.environ.get(LOG_DIR_ENV)
    if not folder:
        return None
    path = Path(folder) / f"{role}-{os.getpid()}.log"
    _redirect_output(path)
    logging.captureWarnings(True)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info("%s started (pid %d) on %s", role, os.getpid(), os.uname().nodename)
    return path
