"""Crash-safe run files: atomic folders, step checkpoints with a latest pointer, progress."""

import os

import pytest
import torch

from grpo.orchestration.checkpointing import Progress, StepCheckpoints, atomic_dir, atomic_write_text, recover_dir


def test_atomic_dir_replaces_or_keeps_old(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("one")
    assert (final / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (final / "a.txt").read_text() == "one"  # the old checkpoint is intact
    assert not list(tmp_path.glob(".ckpt.*"))  # and nothing half-written is left
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("two")
    assert (final / "a.txt").read_text() == "two"


def test_recover_after_crash_between_renames(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "x").write_text("v1")
    os.replace(final, tmp_path / ".ckpt.old")  # the crash window: old moved aside, new not yet in place
    (tmp_path / ".ckpt.abc.tmp").mkdir()
    recover_dir(final)
    assert (final / "x").read_text() == "v1" and not (tmp_path / ".ckpt.abc.tmp").exists()


def test_step_checkpoints_latest_and_pruning(tmp_path):
    ck = StepCheckpoints(tmp_path / "state" / "rl", keep=2)
    assert ck.load_latest() is None
    for step in (1, 2, 3):
        ck.save(step, {"w": torch.full((2,), float(step))})
    step, state = ck.load_latest()
    assert step == 3 and state["w"].tolist() == [3.0, 3.0]
    assert sorted(p.name for p in ck.root.glob("step_*")) == ["step_000002", "step_000003"]
    # a pointer to a checkpoint that never completed falls back to nothing rather than a broken state
    atomic_write_text(ck.root / "latest", "step_000009")
    assert ck.latest() is None


def test_progress_round_trip(tmp_path):
    p = Progress(tmp_path)
    assert not p.done("sft")
    p.complete("sft", {"accuracy": 0.5})
    q = Progress(tmp_path)
    assert q.done("sft") and q.result("sft") == {"accuracy": 0.5}
