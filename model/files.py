"""Crash-safe files: every write goes to a temporary name beside its target and is renamed into place, so a
reader (or a resumed run) sees the old file or the new one, never half of one.

* :func:`atomic_write_bytes` / :func:`atomic_write_text`: one file, through ``os.replace``;
* :func:`atomic_dir`: a folder built in a temporary folder, then swapped in with two renames;
* :func:`recover_dir`: puts back a folder whose swap was interrupted between those two renames.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder, fsync and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def atomic_write_text(path: Path | str, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yields a temporary folder; on success it replaces ``final`` in one rename, on error it is removed.

    An existing ``final`` is moved aside first and deleted after the new folder is in place, so the only
    window without a ``final`` folder is between two renames (and :func:`recover_dir` repairs it).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path | str) -> None:
    """Puts back a folder whose replacement was interrupted between the two renames of :func:`atomic_dir`,
    and removes leftover temporary folders."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if not final.exists() and old.exists():
        os.replace(old, final)
    for tmp in final.parent.glob(f".{final.name}.*.tmp") if final.parent.exists() else ():
        shutil.rmtree(tmp, ignore_errors=True)
