"""Crash-safe run state: step checkpoints and the run's progress record (atomic writes: :mod:`model.files`).

Every checkpoint is written into a temporary folder beside its final place and renamed into place only when
complete, so a crash at any moment leaves either the previous checkpoint or the new one, never half of one.
The ``latest`` pointer of a phase is itself replaced atomically after its checkpoint is in place.

A trainer's checkpoint (:meth:`StepCheckpoints.save_trainer`) holds its model and optimizer state as a
``torch.distributed.checkpoint`` folder (``shards/``: each trainer rank writes its own shards, with the global
shape of every tensor) beside ``state.pt`` (schedule, step, RNG, data position), so a run saved with N trainer
ranks resumes with any number of ranks, one included.

Layout under the run folder::

    progress.json                 phases completed so far (and their held-out evaluations)
    checkpoints/<phase>/          the phase's final Hugging Face checkpoint (policy or reward model)
    state/<phase>/step_000010/    resumable trainer state at a step; state/<phase>/latest names the newest
        state.pt                  everything but the weights and optimizer moments
        shards/                   those, sharded (torch.distributed.checkpoint)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from model.distributed import SINGLE, DataParallel
from model.files import atomic_dir, atomic_write_text, recover_dir

SHARDS = "shards"


@contextlib.contextmanager
def _quiet_single_process() -> Any:
    """One rank saves and loads without a process group, as intended: no warning about it each checkpoint."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class StepCheckpoints:
    """Resumable trainer states of one phase: ``state/<phase>/step_XXXXXX`` plus a ``latest`` pointer.

    Args:
        root: ``run_dir/state/<phase>``.
        keep: How many step checkpoints to keep (older ones are deleted after a new one is complete).
    """

    def __init__(self, root: Path | str, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def save(self, step: int, state: dict[str, Any], extra_files: dict[str, str] | None = None) -> Path:
        """Saves ``state`` (``torch.save``-able) as the checkpoint of ``step`` and points ``latest`` at it."""
        final = self.root / f"step_{step:06d}"
        with atomic_dir(final) as tmp:
            torch.save(state, tmp / "state.pt")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        self._point_latest(final)
        return final

    def save_trainer(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                     dp: DataParallel = SINGLE) -> Path | None:
        """Saves a trainer at ``step``: ``model`` and ``optimizer`` sharded (every rank writes its shards), and
        ``state`` (the rest, ``torch.save``-able) from rank 0; then points ``latest`` at it. A collective: every
        rank calls it. Atomic as :meth:`save`: a crash leaves the previous checkpoint.

        Returns:
            The checkpoint folder (on rank 0; ``None`` on the others).
        """
        final = self.root / f"step_{step:06d}"
        with atomic_dir(final) if dp.is_main else contextlib.nullcontext() as tmp:
            tmp = dp.broadcast(tmp)
            weights, moments = get_state_dict(model, optimizer)
            with _quiet_single_process():
                dcp.save({"model": weights, "optimizer": moments}, checkpoint_id=str(Path(tmp) / SHARDS),
                         process_group=dp.group)
            if dp.is_main:
                torch.save(state, Path(tmp) / "state.pt")
            dp.barrier()  # every rank's shards are on disk before rank 0 moves the folder into place
        if dp.is_main:
            self._point_latest(final)
        dp.barrier()
        return final if dp.is_main else None

    def load_trainer(self, model: nn.Module, optimizer: torch.optim.Optimizer, dp: DataParallel = SINGLE
                     ) -> tuple[int, dict[str, Any]] | None:
        """Restores the newest trainer checkpoint into ``model`` and ``optimizer`` (resharded to this run's ranks,
        whatever their number when it was saved). A collective: every rank calls it.

        Returns:
            ``(step, state)`` with the rest of the trainer's state, or ``None`` when there is no checkpoint. A
            checkpoint from :meth:`save` (weights inside ``state``) is returned as it is, for the trainer to load.
        """
        path = dp.broadcast(self.latest() if dp.is_main else None)
        if path is None:
            return None
        if (path / SHARDS).is_dir():
            weights, moments = get_state_dict(model, optimizer)
            saved = {"model": weights, "optimizer": moments}
            with _quiet_single_process():
                dcp.load(saved, checkpoint_id=str(path / SHARDS), process_group=dp.group)
            set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
        return int(path.name.split("_")[1]), torch.load(path / "state.pt", weights_only=False)

    def _point_latest(self, final: Path) -> None:
        atomic_write_text(self.root / "latest", final.name)
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest(self) -> Path | None:
        """The newest complete checkpoint folder, or None."""
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        recover_dir(path)
        return path if (path / "state.pt").exists() else None

    def load_latest(self) -> tuple[int, dict[str, Any]] | None:
        """``(step, state)`` of the newest checkpoint, or None."""
        path = self.latest()
        if path is None:
            return None
        return int(path.name.split("_")[1]), torch.load(path / "state.pt", weights_only=False)

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class Progress:
    """``progress.json``: which phases are complete, with their results (rewritten atomically)."""

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / "progress.json"
        self.data: dict[str, Any] = {"completed": [], "results": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def done(self, phase: str) -> bool:
        return phase in self.data["completed"]

    def result(self, phase: str) -> Any:
        return self.data["results"].get(phase)

    def complete(self, phase: str, result: Any = None) -> None:
        if phase not in self.data["completed"]:
            self.data["completed"].append(phase)
        self.data["results"][phase] = result
        atomic_write_text(self.path, json.dumps(self.data, indent=2))

    def record_seconds(self, phase: str, seconds: float) -> None:
        """The wall time of the run of ``phase`` that completed it (a resumed phase: its last attempt)."""
        self.data.setdefault("seconds", {})[phase] = round(seconds, 3)
        atomic_write_text(self.path, json.dumps(self.data, indent=2))

    def seconds(self) -> dict[str, float]:
        """Phase -> the wall time recorded by :meth:`record_seconds`, in the order phases completed."""
        return dict(self.data.get("seconds", {}))
