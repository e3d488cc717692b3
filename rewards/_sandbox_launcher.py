"""Sandbox launcher: sets up isolation, runs the untrusted program, reports a JSON status. Standard library only.

Run by :mod:`rewards.sandbox` as ``python -I -S _sandbox_launcher.py SPEC.json`` in a new session, with the
program's stdin/stdout/stderr already connected and a status pipe inherited as ``spec["status_fd"]``. It is not
imported by the package.

With ``spec["isolate"]`` (root only) the launcher, before anything untrusted runs:

1. enters a new network namespace (no interface but a downed loopback: no network at all);
2. enters a new mount namespace (private propagation), makes the interpreter reachable by the sandbox user
   (``expose``: a tmpfs over an unreadable ancestor such as ``/root``, with the interpreter's tree bound back in),
   mounts a size-limited tmpfs owned by the sandbox user on the scratch directory, and remounts every other
   mount read-only;
3. enters a new PID namespace: a forked init (PID 1) runs the program as its only child and exits when it ends,
   which makes the kernel kill every process left in the namespace (fork bombs included, even ones that
   ``setsid``).

In every mode the program's process then gets resource limits (CPU, address space, file size, open files,
process count, no core dumps), its own process group, a parent-death signal, the scratch directory as cwd, the
scrubbed environment, and (with a ``uid``) an unprivileged user and group with no supplementary groups. The
supervisor kills it at the wall-time limit. Without a PID namespace the supervisor is a child subreaper and, when
the program ends, kills its process group and any orphan re-parented to it.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x40000000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
_FLAG_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                 "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}

_libc = ctypes.CDLL(None, use_errno=True)
_child_pid = 0  # the process the SIGTERM handler kills


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    enc = [None if v is None else os.fsencode(v) for v in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _mount_points():
    """(mount point, per-mount flags) from /proc/self/mountinfo, parents first."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            flags = 0
            for option in fields[5].split(","):
                flags |= _FLAG_OPTIONS.get(option, 0)
            points.append((point, flags))
    return points


def _expose(path, stash):
    """Makes directory ``path`` reachable by any user inside this mount namespace (same path, read-only)."""
    path = os.path.realpath(path)
    parts = path.strip("/").split("/")
    blocked = None
    for i in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:i])
        if not os.stat(ancestor).st_mode & 0o001:
            blocked = ancestor
            break
    if blocked is None:
        return
    os.makedirs(stash, mode=0o755)
    _mount(path, stash, None, MS_BIND | MS_REC)
    _mount("tmpfs", blocked, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    os.makedirs(path, mode=0o755, exist_ok=True)
    _mount(stash, path, None, MS_BIND | MS_REC)


def _setup_mounts(spec):
    _check(_libc.unshare(CLONE_NEWNS), "unshare(mount)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    for i, path in enumerate(spec["expose"]):
        _expose(path, os.path.join(spec["run_dir"], f".stash{i}"))
    uid = spec["uid"] if spec["uid"] is not None else os.getuid()
    gid = spec["gid"] if spec["gid"] is not None else os.getgid()
    _mount("tmpfs", spec["scratch"], "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['scratch_bytes']},mode=0700,uid={uid},gid={gid}")
    failed = []
    for point, flags in _mount_points():
        if point == spec["scratch"]:
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError as exc:
            if point == "/":
                raise
            failed.append(f"{point} ({exc.strerror})")
    return failed


def _isolate(spec, layers, problems):
    """Enters the namespaces; records what worked in ``layers`` and what did not in ``problems``."""
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(net)")
        layers.append("net-namespace")
    except OSError as exc:
        problems.append(str(exc))
    try:
        failed = _setup_mounts(spec)
        layers.append("read-only-mounts")
        if failed:
            problems.append("could not remount read-only: " + ", ".join(failed))
    except OSError as exc:
        problems.append(f"mount namespace: {exc}")
    try:
        _check(_libc.unshare(CLONE_NEWPID), "unshare(pid)")
        layers.append("pid-namespace")
    except OSError as exc:
        problems.append(str(exc))


def _user_process_count(uid):
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _apply_limits(limits, nproc):
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"], limits["open_files"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _exec_program(spec, nproc, errw):
    """In the forked child: limits, identity, cwd, exec. Reports a setup failure on ``errw``; never returns."""
    try:
        os.setpgid(0, 0)
        _apply_limits(spec["limits"], nproc)
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PDEATHSIG)")
        os.chdir(spec["scratch"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as exc:
        os.write(errw, f"{type(exc).__name__}: {exc}".encode()[:2000])
    finally:
        os._exit(127)


def _wait_with_deadline(pid, seconds):
    """Waits for ``pid`` at most ``seconds``; returns whether it is still running."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return False
            time.sleep(0.01)
        return True
    try:
        return not select.select([fd], [], [], max(seconds, 0.0))[0]
    finally:
        os.close(fd)


def _kill_orphans(pgid):
    """Kills the program's process group and every remaining child (orphans come to us as subreaper)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
    me = str(os.getpid())
    for _ in range(100):
        children = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stat = f.read()
                except OSError:
                    continue
                if stat.rsplit(")", 1)[1].split()[1] == me:
                    children.append(int(entry))
        if not children:
            return
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
            except OSError:
                pass


def _supervise(spec, layers):
    """Forks and runs the program, enforcing the wall time; returns the status dictionary."""
    global _child_pid
    if "pid-namespace" not in layers:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    limits = spec["limits"]
    nproc = limits["processes"]
    if spec["uid"] is None and os.getuid() != 0:  # RLIMIT_NPROC counts all of this user's processes
        nproc += _user_process_count(os.getuid())
    errr, errw = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(errr)
        _exec_program(spec, nproc, errw)
    _child_pid = pid
    os.close(errw)
    setup_error = os.read(errr, 4096).decode(errors="replace")
    os.close(errr)
    timed_out = False
    if not setup_error and _wait_with_deadline(pid, spec["wall_s"]):
        timed_out = True
        for kill, target in ((os.killpg, pid), (os.kill, pid)):
            try:
                kill(target, signal.SIGKILL)
            except OSError:
                pass
    _, status, usage = os.wait4(pid, 0)
    wall = time.monotonic() - start
    _kill_orphans(pid)
    return {
        "setup_error": setup_error or None,
        "timed_out": timed_out,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "max_rss_kb": usage.ru_maxrss,
        "wall_s": wall,
    }


def _on_sigterm(signum, frame):
    """Stop now: kill the program (or the namespace's init), its process group and, as subreaper, orphans."""
    if _child_pid:
        for kill in (os.killpg, os.kill):
            try:
                kill(_child_pid, signal.SIGKILL)
            except OSError:
                pass
        _kill_orphans(_child_pid)
    os._exit(143)


def _report(fd, status):
    os.write(fd, (json.dumps(status) + "\n").encode())


def _run_in_pid_namespace(spec, layers, problems, status_fd):
    """Forks the namespace's init, which supervises the program; returns the status."""
    global _child_pid
    init = os.fork()
    if init == 0:
        try:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                layers.append("private-proc")
            except OSError:
                pass
            _report(status_fd, {**_supervise(spec, layers), "layers": layers, "problems": problems})
        finally:
            os._exit(0)
    _child_pid = init
    if _wait_with_deadline(init, spec["wall_s"] + 5.0):
        os.kill(init, signal.SIGKILL)
        os.waitpid(init, 0)
        return {"timed_out": True, "layers": layers, "problems": problems, "setup_error": None}
    os.waitpid(init, 0)
    return None


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    status_fd = spec["status_fd"]
    os.set_inheritable(status_fd, False)
    signal.signal(signal.SIGTERM, _on_sigterm)
    layers, problems = [], []
    if spec["isolate"]:
        _isolate(spec, layers, problems)
        if spec["require_isolation"] and (problems or len(layers) < 3):
            _report(status_fd, {"setup_error": "isolation unavailable: " + "; ".join(problems), "layers": layers})
            return
        if "read-only-mounts" not in layers:  # the interpreter may be unreachable for another user
            spec["uid"] = spec["gid"] = None
    if spec["uid"] is not None:
        layers.append("unprivileged-user")
    if "pid-namespace" in layers:
        status = _run_in_pid_namespace(spec, layers, problems, status_fd)
        if status is not None:
            _report(status_fd, status)
    else:
        _report(status_fd, {**_supervise(spec, layers), "layers": layers, "problems": problems})


if __name__ == "__main__":
    main()
