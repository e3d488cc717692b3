"""Sandbox preamble: runs the untrusted program after installing in-process tripwires. Standard library only.

Passed by :mod:`rewards.sandbox` as ``python -I -S -X utf8 -c <this source> PROGRAM``. Before executing
``PROGRAM`` as ``__main__`` it replaces ``open``/``io.open``/``os.open`` and the ``os`` functions that create,
change or delete files with versions that refuse paths outside the scratch directory (the cwd), and replaces
``socket.socket``/``socket.create_connection`` with versions that refuse to open sockets. A refusal raises
``PermissionError("sandbox violation: ...")``.

These are tripwires for honest mistakes, **not** a security boundary: the program can reach the originals (for
instance through ``_socket`` or ``posix``). The boundary is the kernel-level layers the launcher sets up.
"""

import builtins
import io
import os
import socket
import sys

VIOLATION = "sandbox violation"


def _path_checker(scratch):
    """A function raising PermissionError for any path outside ``scratch``."""
    realpath, fsdecode = os.path.realpath, os.fsdecode

    def inside(path):
        if isinstance(path, int):  # an already open file descriptor
            return True
        resolved = realpath(fsdecode(path))
        return resolved == scratch or resolved.startswith(scratch + os.sep)

    def check(what, *paths):
        for path in paths:
            if not inside(path):
                raise PermissionError(f"{VIOLATION}: {what} outside the scratch directory: {path!r}")

    return check


def _guard_open(check):
    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+"):
            check("writing", file)
        return real_open(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open

    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags:
            check("writing", path)
        return real_os_open(path, flags, *args, **kwargs)

    os.open = guarded_os_open


def _guard_os(check):
    def guard(name, n_paths):
        real = getattr(os, name)

        def guarded(*args, **kwargs):
            check(f"os.{name}", *args[:n_paths])
            return real(*args, **kwargs)

        setattr(os, name, guarded)

    for name in ("remove", "unlink", "rmdir", "removedirs", "mkdir", "makedirs", "chmod", "chown", "truncate",
                 "mkfifo", "utime"):
        guard(name, 1)
    for name in ("rename", "replace", "link", "symlink"):
        guard(name, 2)


def _guard_network():
    def no_network(*args, **kwargs):
        raise PermissionError(f"{VIOLATION}: network access is disabled")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()

    socket.socket = NoSocket
    socket.create_connection = socket.create_server = socket.socketpair = socket.fromfd = no_network


def _main():
    program = sys.argv[1]
    with open(program, encoding="utf-8") as f:
        source = f.read()
    check = _path_checker(os.path.realpath(os.getcwd()))
    _guard_open(check)
    _guard_os(check)
    _guard_network()
    sys.argv = ["main.py"]
    code = compile(source, "main.py", "exec")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    exec(code, namespace)


if __name__ == "__main__":
    _main()
