"""Runs untrusted Python programs (model-written code) in a sandboxed child process.

Each run gets a fresh temporary directory, a scrubbed environment (``PATH=/usr/bin:/bin``, ``HOME`` = the
scratch dir, UTF-8 locale; nothing inherited) and ``python -I -S`` (no site-packages, no user paths, ``PYTHON*``
variables ignored; the standard library only). The launcher (:mod:`rewards._sandbox_launcher`) applies these
layers; "strong" means enforced by the kernel, "weak" means a tripwire the program can get around:

=====================  ======  ===================================================================================
layer                  needs   what it gives
=====================  ======  ===================================================================================
resource limits        -       strong: RLIMIT_CPU (SIGXCPU then SIGKILL), RLIMIT_AS (allocations fail with
                               MemoryError), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC, no core dumps
wall time, output cap  -       strong: the supervisor SIGKILLs the program at ``wall_time_s``; at most
                               ``max_output_bytes`` of stdout/stderr are read, more stops the run
process cleanup        -       own process group, parent-death signal, supervisor as child subreaper killing the
                               group and orphans afterwards (a program that ``setsid``-s and re-parents away can
                               escape this without the PID namespace)
preamble tripwires     -       weak: ``open``/``os.open``/``os.remove``/... refuse paths outside the scratch dir;
                               ``socket`` refuses to open sockets (reachable again through ``_socket``/``posix``)
network namespace      root    strong: no network at all, loopback included
read-only mounts       root    strong: private mount namespace, every mount read-only except a size-limited tmpfs
                               scratch (``scratch_bytes``); an unreadable home holding the interpreter (``/root``)
                               is hidden behind a tmpfs; world-readable files elsewhere stay readable
PID namespace          root    strong: the program cannot see or signal outside processes; when it ends the kernel
                               kills every process it left (fork bombs, daemons)
unprivileged user      root    strong: a dedicated uid/gid per concurrent run (``uid_base + slot``, slots locked
                               across processes with ``flock``) and no supplementary groups, so RLIMIT_NPROC
                               counts that run's processes only and no root capability remains
=====================  ======  ===================================================================================

``isolation="auto"`` uses the root-only layers when the process is root (as in containers) and reports which ones
took effect in :attr:`SandboxResult.layers`; ``"namespaces"`` refuses to run code unless all of them do;
``"none"`` uses only the first four rows. Without root, RLIMIT_NPROC is set to this user's current process count
plus ``max_processes``; it is per user, so concurrent runs share it.
"""

from __future__ import annotations

import fcntl
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

_HERE = Path(__file__).resolve().parent
_LAUNCHER = _HERE / "_sandbox_launcher.py"
_PREAMBLE = (_HERE / "_sandbox_preamble.py").read_text()
_STARTUP_ALLOWANCE_S = 5.0  # host-side backstop beyond the wall time (launcher and namespace setup)

REASONS: tuple[str, ...] = (
    "ok", "runtime_error", "timeout", "cpu_limit", "memory_limit", "output_limit", "file_limit",
    "process_limit", "violation", "sandbox_error",
)
"""Why a run ended: :attr:`SandboxResult.reason` is one of these."""

Isolation = Literal["auto", "namespaces", "none"]
MiB = 1 << 20


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of sandboxed runs.

    Attributes:
        wall_time_s: Wall-clock limit of one run.
        cpu_time_s: CPU-time limit of one run (per process), whole seconds.
        memory_bytes: Address-space limit (RLIMIT_AS).
        max_output_bytes: Most bytes read from stdout (more ends the run) and kept from stderr.
        max_file_bytes: Largest file the program may write (RLIMIT_FSIZE).
        scratch_bytes: Size of the scratch tmpfs (with read-only mounts).
        max_processes: Most processes (threads included) of a run (RLIMIT_NPROC, see the module docstring).
        max_open_files: RLIMIT_NOFILE.
        max_concurrency: Most runs at the same time through one :class:`Sandbox`.
        isolation: ``"auto"``, ``"namespaces"`` or ``"none"``.
        python: Interpreter of the program (default: the one running this code, symlinks resolved).
        uid_base: First uid of the dedicated sandbox users (root only); must not belong to anyone.
        uid_slots: How many dedicated uids to use (the most concurrent runs on this machine).
    """

    wall_time_s: float = 10.0
    cpu_time_s: int = 5
    memory_bytes: int = 512 * MiB
    max_output_bytes: int = 1 * MiB
    max_file_bytes: int = 16 * MiB
    scratch_bytes: int = 64 * MiB
    max_processes: int = 32
    max_open_files: int = 256
    max_concurrency: int = 4
    isolation: Isolation = "auto"
    python: str | None = None
    uid_base: int = 200_000
    uid_slots: int = 64

    def __post_init__(self) -> None:
        if not self.wall_time_s > 0:
            raise ValueError(f"sandbox wall_time_s must be > 0, got {self.wall_time_s!r}")
        for name in ("cpu_time_s", "memory_bytes", "max_output_bytes", "max_file_bytes", "scratch_bytes",
                     "max_processes", "max_open_files", "max_concurrency", "uid_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"sandbox {name} must be a positive integer, got {value!r}")
        if self.isolation not in ("auto", "namespaces", "none"):
            raise ValueError(f"sandbox isolation must be 'auto', 'namespaces' or 'none', got {self.isolation!r}")
        if not isinstance(self.uid_base, int) or self.uid_base < 1000:
            raise ValueError(f"sandbox uid_base must be an integer >= 1000, got {self.uid_base!r}")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one run.

    Attributes:
        ok: The program ran to completion with exit code 0.
        reason: One of :data:`REASONS`.
        stdout: Captured stdout (UTF-8, at most ``max_output_bytes``).
        stderr: Captured stderr (same cap).
        exit_code: Exit code, or ``None`` when killed by a signal or not started.
        signal: The signal that killed the program, if any.
        wall_time_s: Wall time of the program.
        cpu_time_s: CPU time of the program's main process.
        layers: The isolation layers that took effect (see the module docstring).
        detail: A short human-readable explanation of ``reason``.
    """

    ok: bool
    reason: str
    stdout: str
    stderr: str
    exit_code: int | None
    signal: int | None
    wall_time_s: float
    cpu_time_s: float
    layers: tuple[str, ...]
    detail: str = ""


class _UidPool:
    """Hands out dedicated uids, locked across processes with ``flock`` on files in a root-only directory."""

    def __init__(self, base: int, slots: int) -> None:
        self.base, self.slots = base, slots
        self.lock_dir = Path(tempfile.gettempdir()) / "grpo-sandbox-uids"

    def acquire(self, timeout_s: float) -> tuple[int, int]:
        """Returns ``(uid, lock_fd)``; waits for a free slot up to ``timeout_s``."""
        self.lock_dir.mkdir(mode=0o700, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        while True:
            for uid in range(self.base, self.base + self.slots):
                fd = os.open(self.lock_dir / f"{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return uid, fd
                except BlockingIOError:
                    os.close(fd)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no free sandbox uid in [{self.base}, {self.base + self.slots})")
            time.sleep(0.05)

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing the descriptor releases the flock


class Sandbox:
    """Runs Python programs under :class:`SandboxConfig` limits; thread-safe, bounded concurrency.

    Example:
        >>> Sandbox().run("print(int(input()) * 2)", stdin="21\\n").stdout
        '42\\n'
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._slots = threading.BoundedSemaphore(self.config.max_concurrency)
        self._uids = _UidPool(self.config.uid_base, self.config.uid_slots)
        self._python = os.path.realpath(self.config.python or sys.executable)
        isolate = self.config.isolation == "namespaces" or (self.config.isolation == "auto" and os.geteuid() == 0)
        self._isolate = isolate

    def run_many(self, code: str, stdins: Sequence[str]) -> list[SandboxResult]:
        """Runs ``code`` once per stdin, in parallel threads (at most ``max_concurrency`` runs at a time)."""
        if len(stdins) <= 1:
            return [self.run(code, s) for s in stdins]
        with ThreadPoolExecutor(max_workers=min(len(stdins), self.config.max_concurrency)) as pool:
            return list(pool.map(lambda s: self.run(code, s), stdins))

    def run(self, code: str, stdin: str = "") -> SandboxResult:
        """Runs ``code`` with ``stdin`` and returns what happened; never raises for the program's behaviour."""
        with self._slots:
            uid_lock = self._uids.acquire(self.config.wall_time_s + 60) if self._isolate else None
            run_dir = Path(tempfile.mkdtemp(prefix="grpo-sandbox-"))
            try:
                return self._run_in(run_dir, code, stdin, None if uid_lock is None else uid_lock[0])
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
                if uid_lock is not None:
                    self._uids.release(uid_lock[1])

    # ------------------------------------------------------------------------------------------ internals
    def _spec(self, run_dir: Path, uid: int | None, status_fd: int) -> dict:
        cfg = self.config
        scratch = run_dir / "scratch"
        scratch.mkdir(mode=0o700)
        os.chmod(run_dir, 0o711)
        program = run_dir / "main.py"
        return {
            "argv": [self._python, "-I", "-S", "-X", "utf8", "-c", _PREAMBLE, str(program)],
            "env": {"PATH": "/usr/bin:/bin", "HOME": str(scratch), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            "run_dir": str(run_dir),
            "scratch": str(scratch),
            "uid": uid,
            "gid": uid,
            "isolate": self._isolate,
            "require_isolation": cfg.isolation == "namespaces",
            "expose": [os.path.dirname(os.path.dirname(self._python)), str(run_dir)],
            "scratch_bytes": cfg.scratch_bytes,
            "wall_s": cfg.wall_time_s,
            "status_fd": status_fd,
            "limits": {"cpu_s": cfg.cpu_time_s, "memory_bytes": cfg.memory_bytes, "file_bytes": cfg.max_file_bytes,
                       "open_files": cfg.max_open_files, "processes": cfg.max_processes},
        }

    def _run_in(self, run_dir: Path, code: str, stdin: str, uid: int | None) -> SandboxResult:
        status_r, status_w = os.pipe()
        try:
            spec = self._spec(run_dir, uid, status_w)
            Path(spec["argv"][-1]).write_bytes(code.encode("utf-8", errors="replace"))
            os.chmod(spec["argv"][-1], 0o644)
            (run_dir / "spec.json").write_text(json.dumps(spec))
            (run_dir / "stdin").write_bytes(stdin.encode("utf-8", errors="replace"))
            with open(run_dir / "stdin", "rb") as stdin_file:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", str(_LAUNCHER), str(run_dir / "spec.json")],
                    stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                    start_new_session=True, env={"PATH": "/usr/bin:/bin"}, cwd=run_dir,
                )
            os.close(status_w)
            status_w = -1
            deadline = time.monotonic() + self.config.wall_time_s + _STARTUP_ALLOWANCE_S
            stdout, stderr, overflow, late = _collect(proc, deadline, self.config.max_output_bytes)
            _stop(proc, graceful=overflow or late)
            status = _read_status(status_r)
        finally:
            os.close(status_r)
            if status_w >= 0:
                os.close(status_w)
        return _result(status, stdout, stderr, overflow, late, self.config)


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Reads stdout and stderr until both close or ``deadline``; keeps at most ``cap`` bytes of each.

    Returns:
        ``(stdout, stderr, stdout_overflowed, deadline_passed)``.
    """
    buffers = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    with selectors.DefaultSelector() as selector:
        for stream in buffers:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), False, True
            for key, _ in selector.select(timeout=min(remaining, 0.5)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buffer = buffers[key.fileobj]
                room = max(cap - len(buffer), 0)
                buffer += chunk[:room]
                if len(chunk) > room and key.fileobj is proc.stdout:
                    return bytes(buffer), bytes(buffers[proc.stderr]), True, False
    return bytes(buffers[proc.stdout]), bytes(buffers[proc.stderr]), False, False


def _stop(proc: subprocess.Popen, graceful: bool) -> None:
    """Ends the launcher: SIGTERM (it then kills the program) when asked, SIGKILL to its group as a backstop."""
    if graceful and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        stream.close()


def _read_status(fd: int) -> dict:
    """The launcher's last JSON status line (empty when it reported nothing)."""
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    lines = [line for line in data.decode(errors="replace").splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


_VIOLATION_MARKS = ("sandbox violation", "Read-only file system", "Network is unreachable")
_MEMORY_MARKS = ("MemoryError", "Cannot allocate memory")
_PROCESS_MARKS = ("BlockingIOError", "Resource temporarily unavailable", "can't start new thread")


def _classify(status: dict, stderr: str, overflow: bool, late: bool, cfg: SandboxConfig) -> tuple[str, str]:
    """``(reason, detail)`` of a run."""
    sig = status.get("signal")
    if status.get("setup_error"):
        return "sandbox_error", f"sandbox setup failed: {status['setup_error']}"
    if overflow:
        return "output_limit", f"stdout exceeded {cfg.max_output_bytes} bytes"
    if late or status.get("timed_out"):
        return "timeout", f"wall time exceeded {cfg.wall_time_s} s"
    if not status:
        return "sandbox_error", "the launcher reported no status: " + stderr.strip()[-300:]
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and status.get("cpu_s", 0.0) >= cfg.cpu_time_s - 0.05):
        return "cpu_limit", f"CPU time exceeded {cfg.cpu_time_s} s"
    if sig == signal.SIGXFSZ:
        return "file_limit", f"a file exceeded {cfg.max_file_bytes} bytes"
    if status.get("exit_code") == 0 and sig is None:
        return "ok", ""
    tail = stderr[-2000:]
    violation = next((ln for ln in reversed(tail.splitlines()) if any(m in ln for m in _VIOLATION_MARKS)), None)
    if violation is not None:
        return "violation", violation.strip()[:500]
    if "File too large" in tail:  # Python ignores SIGXFSZ, so the write fails with EFBIG
        return "file_limit", f"a file exceeded {cfg.max_file_bytes} bytes"
    if any(mark in tail for mark in _MEMORY_MARKS):
        return "memory_limit", f"memory limit of {cfg.memory_bytes} bytes reached"
    if any(mark in tail for mark in _PROCESS_MARKS):
        return "process_limit", f"process limit of {cfg.max_processes} reached"
    last = tail.strip().splitlines()[-1] if tail.strip() else ""
    how = f"signal {sig}" if sig is not None else f"exit code {status.get('exit_code')}"
    return "runtime_error", f"{how}: {last}"[:500]


def _result(
    status: dict, stdout: bytes, stderr: bytes, overflow: bool, late: bool, cfg: SandboxConfig
) -> SandboxResult:
    err = stderr.decode("utf-8", errors="replace")
    reason, detail = _classify(status, err, overflow, late, cfg)
    return SandboxResult(
        ok=reason == "ok",
        reason=reason,
        stdout=stdout.decode("utf-8", errors="replace"),
        stderr=err,
        exit_code=status.get("exit_code"),
        signal=status.get("signal"),
        wall_time_s=float(status.get("wall_s", 0.0)),
        cpu_time_s=float(status.get("cpu_s", 0.0)),
        layers=tuple(status.get("layers", ())),
        detail=detail,
    )
