"""The code sandbox against each attack: every one ends with a reason, no hang, no side effect on this machine."""

import os
import socket
import threading

import psutil
import pytest

from rewards.sandbox import Sandbox, SandboxConfig

FAST = {"wall_time_s": 2.0, "cpu_time_s": 1, "memory_bytes": 256 << 20, "max_output_bytes": 4096}


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(**FAST))


@pytest.fixture(scope="module")
def plain():
    """Only the layers that need no privileges (what a non-root user gets)."""
    return Sandbox(SandboxConfig(**FAST, isolation="none"))


@pytest.fixture(scope="module")
def layers(sandbox):
    return set(sandbox.run("pass").layers)


def leftover_processes():
    """Processes still running a sandboxed program (their command line names a sandbox run directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "grpo-sandbox-" in cmdline and "main.py" in cmdline:
            found.append(proc.pid)
    return found


def test_runs_a_program_with_stdin_in_a_clean_environment(sandbox):
    code = "import os, sys\nprint(int(input()) * 2)\nprint(sorted(os.environ))\nprint(os.getcwd())\n" \
        "print(sys.flags.isolated)"
    result = sandbox.run(code, stdin="21\n")
    assert result.ok and result.reason == "ok" and result.exit_code == 0
    doubled, env, cwd, isolated = result.stdout.splitlines()
    assert doubled == "42"
    assert env == "['HOME', 'LANG', 'LC_ALL', 'PATH']"  # nothing inherited from this process
    assert isolated == "1"
    assert "grpo-sandbox-" in cwd and not os.path.exists(cwd)  # a fresh scratch dir, deleted afterwards


def test_scratch_is_writable_and_fresh_every_run(sandbox):
    first = sandbox.run("open('note.txt', 'w').write('hi'); print(open('note.txt').read())")
    assert first.ok and first.stdout == "hi\n"
    second = sandbox.run("import os; print(os.path.exists('note.txt'))")
    assert second.ok and second.stdout == "False\n"


def test_runtime_error_is_reported(sandbox):
    result = sandbox.run("1 / 0")
    assert not result.ok and result.reason == "runtime_error" and result.exit_code == 1
    assert "ZeroDivisionError" in result.detail and "ZeroDivisionError" in result.stderr


@pytest.mark.parametrize("isolation", ["auto", "none"])
def test_infinite_loop_hits_the_cpu_limit(isolation):
    # a generous wall time, so that 1 s of CPU comes first even on a busy machine
    box = Sandbox(SandboxConfig(**{**FAST, "wall_time_s": 8.0}, isolation=isolation))
    result = box.run("while True:\n    pass")
    assert result.reason == "cpu_limit" and not result.ok
    assert result.cpu_time_s >= 0.9


@pytest.mark.parametrize("box", ["sandbox", "plain"])
def test_sleeping_program_hits_the_wall_time(box, request):
    result = request.getfixturevalue(box).run("import time\ntime.sleep(60)")
    assert result.reason == "timeout" and result.signal == 9
    assert result.wall_time_s < FAST["wall_time_s"] + 1.0


@pytest.mark.parametrize("box", ["sandbox", "plain"])
def test_huge_allocation_hits_the_memory_limit(box, request):
    result = request.getfixturevalue(box).run("x = bytearray(8 * 1024 ** 3)")
    assert result.reason == "memory_limit"
    assert "MemoryError" in result.stderr


@pytest.mark.parametrize("box", ["sandbox", "plain"])
def test_output_flood_is_cut(box, request):
    result = request.getfixturevalue(box).run("import os\nos.fork()\nwhile True:\n    print('x' * 1000)")
    assert result.reason == "output_limit" and len(result.stdout) <= FAST["max_output_bytes"]
    assert not leftover_processes()


def test_file_size_limit():
    box = Sandbox(SandboxConfig(**FAST, max_file_bytes=1 << 20))
    result = box.run("open('big', 'wb').write(b'x' * (2 << 20))")
    assert result.reason == "file_limit"


def fork_bomb_box():
    if os.geteuid() == 0 and "unprivileged-user" not in Sandbox(SandboxConfig(**FAST)).run("pass").layers:
        pytest.skip("as root without a dedicated uid RLIMIT_NPROC does not apply")
    return Sandbox(SandboxConfig(**FAST, max_processes=16))


def test_fork_bomb_is_contained_and_cleaned_up():
    box = fork_bomb_box()
    result = box.run("import os\nwhile True:\n    os.fork()")
    assert result.reason in ("process_limit", "timeout") and not result.ok
    assert not leftover_processes()  # forked copies keep the command line, so none of the bomb survives


def test_fork_bomb_that_ignores_errors_is_killed_at_wall_time():
    box = fork_bomb_box()
    result = box.run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    assert result.reason in ("timeout", "cpu_limit", "process_limit")
    assert not leftover_processes()


@pytest.mark.parametrize("box", ["sandbox", "plain"])
def test_detached_daemon_does_not_survive(box, request):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(30)\n"
        "    os._exit(0)\n"
        "print('parent exits')"
    )
    result = request.getfixturevalue(box).run(code)
    assert result.ok and result.stdout == "parent exits\n"
    assert not leftover_processes()


@pytest.mark.parametrize("box", ["sandbox", "plain"])
def test_write_outside_scratch_is_refused(box, request, tmp_path):
    target = tmp_path / "pwned.txt"
    result = request.getfixturevalue(box).run(f"open({str(target)!r}, 'w').write('x')")
    assert result.reason == "violation" and "outside the scratch directory" in result.detail
    assert not target.exists()


def test_write_bypassing_the_tripwire_hits_read_only_mounts(sandbox, layers):
    if "read-only-mounts" not in layers:
        pytest.skip("read-only mounts need root (mount namespace)")
    target = "/tmp/grpo-sandbox-pwned.txt"
    code = f"import posix\nfd = posix.open({target!r}, posix.O_WRONLY | posix.O_CREAT)\nposix.write(fd, b'x')"
    result = sandbox.run(code)
    assert result.reason == "violation" and "Read-only file system" in result.detail
    assert not os.path.exists(target)


@pytest.fixture()
def listener():
    """A TCP server on 127.0.0.1 that counts accepted connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


@pytest.mark.parametrize("box", ["sandbox", "plain"])
def test_socket_is_refused(box, request, listener):
    port, accepted = listener
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')"
    result = request.getfixturevalue(box).run(code)
    assert result.reason == "violation" and "network access is disabled" in result.detail
    assert accepted == []


def test_raw_socket_has_no_network(sandbox, layers, listener):
    if "net-namespace" not in layers:
        pytest.skip("the network namespace needs root")
    port, accepted = listener
    code = f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))"
    result = sandbox.run(code)
    assert not result.ok and result.reason == "violation" and "Network is unreachable" in result.detail
    assert accepted == []


def test_root_gets_every_layer(layers):
    if os.geteuid() != 0:
        pytest.skip("namespaces and a dedicated uid need root")
    assert layers >= {"net-namespace", "read-only-mounts", "pid-namespace", "unprivileged-user"}
    box = Sandbox(SandboxConfig(**FAST, isolation="namespaces"))
    code = "import os\nprint(os.getuid() >= 200000, os.getpid(), [p for p in os.listdir('/proc') if p.isdigit()])"
    result = box.run(code)
    # an unprivileged uid; PID 2 under the namespace's init, and no other process visible
    assert result.ok and result.stdout.split(" ", 2) == ["True", "2", "['1', '2']\n"]


def test_run_many_bounds_concurrency(monkeypatch):
    box = Sandbox(SandboxConfig(**FAST, max_concurrency=2))
    active, peak, lock = [0], [0], threading.Lock()
    gate = threading.Barrier(2, timeout=5)

    def fake_run_in(run_dir, code, stdin, uid):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        gate.wait()  # two runs must be inside at once, or this times out
        with lock:
            active[0] -= 1
        return stdin

    monkeypatch.setattr(box, "_run_in", fake_run_in)
    assert box.run_many("print()", [str(i) for i in range(6)]) == [str(i) for i in range(6)]
    assert peak[0] == 2


def test_config_validation():
    with pytest.raises(ValueError, match="sandbox memory_bytes must be a positive integer"):
        SandboxConfig(memory_bytes=0)
    with pytest.raises(ValueError, match="sandbox isolation must be"):
        SandboxConfig(isolation="docker")
    with pytest.raises(ValueError, match="wall_time_s must be > 0"):
        SandboxConfig(wall_time_s=0)
