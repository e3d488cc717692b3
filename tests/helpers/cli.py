"""Running the ``grpo`` command (or any Python module) in a child process the way a user does, with its output
kept: a failing child's stdout and stderr are part of the assertion message."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from tests.helpers import ROOT


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: one thread per op, the repository importable (tests' helpers too)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def grpo_cmd(*args: str) -> list[str]:
    """``python -m grpo ARGS``."""
    return [sys.executable, "-m", "grpo", *args]


def run(cmd: Sequence[str], *, expect: int = 0, timeout: int = 900, **kwargs: Any) -> subprocess.CompletedProcess:
    """Runs ``cmd`` from the repository root and asserts its exit code, showing the child's output when it is
    not ``expect``."""
    proc = subprocess.run(list(cmd), cwd=kwargs.pop("cwd", ROOT), env=kwargs.pop("env", child_env()),
                          timeout=timeout, capture_output=True, text=True, **kwargs)
    assert proc.returncode == expect, (f"{' '.join(cmd)} exited {proc.returncode} (expected {expect}):\n"
                                       f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def run_grpo(*args: str, expect: int = 0, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs ``grpo ARGS`` (see :func:`run`)."""
    return run(grpo_cmd(*args), expect=expect, timeout=timeout)
