"""Crash-safe run state: step checkpoints and the run's progress record (atomic writes: :mod:`model.files`).

Every checkpoint is written into a temporary folder beside its final place and renamed into place only when
complete, so a crash at any moment leaves either the previous checkpoint or the new one, never half of one.
The ``latest`` pointer of a phase is itself replaced atomically after its checkpoint is in place.

Layout under the run folder::

    progress.json                 phases completed so far (and their held-out evaluations)
    checkpoints/<phase>/          the phase's final Hugging Face checkpoint (policy or reward model)
    state/<phase>/step_000010/    resumable trainer state at a step; state/<phase>/latest names the newest
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from model.files import atomic_dir, atomic_write_text, recover_dir


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
        atomic_write_text(self.root / "latest", final.name)
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

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
