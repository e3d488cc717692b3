"""What a run shows: one driver-drawn display per phase, the workers' and libraries' output in ``logs/``."""

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from grpo.orchestration.console import Console, PhaseProgress, format_values
from tests.grpo.orchestration.test_hf_models import overrides
from tests.helpers import ROOT
from tests.helpers.cli import child_env, grpo_cmd, run_grpo
from tests.helpers.hf_models import llama_folder
from tests.helpers.recipes import micro_recipe

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_plain_output_is_one_line_per_step_with_the_phase_numbers_and_an_eta():
    out = io.StringIO()  # not a terminal
    display = PhaseProgress(out, "rl_reason", "rl", total=3)
    for step in (1, 2, 3):
        display.update(step, {"reward/mean": 0.5 * step, "kl": 0.001, "tokens_per_s": 1234.4, "other": 1.0})
        time.sleep(0.01)
    display.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0] == "[grpo] rl_reason 1/3  reward 0.500  kl 0.0010  tok/s 1234"  # no pace yet: no ETA
    assert re.fullmatch(r"\[grpo\] rl_reason 2/3  reward 1\.000  kl 0\.0010  tok/s 1234  eta 0:0\d", lines[1])
    assert lines[2].startswith("[grpo] rl_reason 3/3  reward 1.500") and "eta" not in lines[2]


def test_sft_shows_loss_and_lr_and_a_total_learned_on_the_way():
    out = io.StringIO()
    display = PhaseProgress(out, "sft", "sft")
    display.update(10, {"loss": 1.23456, "lr": 3e-4, "tokens_per_s": float("nan")}, total=40)
    assert out.getvalue() == "[grpo] sft 10/40  loss 1.2346  lr 3.00e-04\n"
    assert format_values("rm", {"loss": 0.5}) == "loss 0.5000"
    Console(out).print("phase sft")
    assert out.getvalue().endswith("[grpo] phase sft\n")


def _run_in_terminal(cmd: list[str], timeout: float = 600) -> tuple[int, str]:
    """Runs ``cmd`` with a pseudo-terminal as its stdin, stdout and stderr; its exit code and what it wrote."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows, 120 columns
    proc = subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child, cwd=ROOT, env=child_env(),
                            close_fds=True)
    os.close(child)
    chunks, deadline = [], time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                data = os.read(main, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.kill() if proc.poll() is None else None
    os.close(main)
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_a_terminal_shows_only_the_drivers_displays_and_the_logs_folder_has_the_rest(tmp_path):
    # a Hugging Face model: transformers draws "Loading weights" bars in every worker that loads it
    model = llama_folder(tmp_path / "model")
    code, text = _run_in_terminal(grpo_cmd("run", "hf_grpo", *overrides(tmp_path / "runs", model)))
    screen = ANSI.sub("", text).replace("\r", "\n")
    assert code == 0, screen[-4000:]
    lines = [line for line in screen.splitlines() if line.strip()]
    assert not [line for line in lines if "pid=" in line]  # nothing forwarded from a worker
    assert not [line for line in lines if re.search(r"warn|deprecat|Loading weights|Writing model", line, re.I)]
    ours = ("[grpo] ", "sft:", "rl_reason:")
    assert all(line.startswith(ours) for line in lines), [line for line in lines if not line.startswith(ours)]
    assert any(re.match(r"rl_reason: 100%\|.*\| 3/3 .*reward \d\.\d{3}  kl \d\.\d{4}  tok/s \d+", line)
               for line in lines), screen[-3000:]
    logs = tmp_path / "runs" / "hf" / "logs"
    roles = {p.name.split("-")[0] for p in logs.glob("*.log")}
    assert roles == {"driver.log", "PolicyWorker", "RolloutWorker", "ReferenceWorker", "RewardWorker"}
    worker_output = "".join(p.read_text(errors="replace") for p in logs.glob("*Worker*.log"))
    assert "Loading weights" in worker_output and "RolloutWorker started" in worker_output
    assert "deprecated" not in worker_output  # transformers' cache argument is passed by its current name


@pytest.mark.slow
def test_without_a_terminal_a_run_prints_one_line_per_step(tmp_path):
    proc = run_grpo("run", str(micro_recipe(tmp_path, steps=3)), "phases=[sft, rl_reason]")
    lines = proc.stdout.splitlines()
    assert "\r" not in proc.stdout and not proc.stderr.strip(), proc.stderr[-2000:]
    steps = [line for line in lines if re.match(r"\[grpo\] (sft|rl_reason) \d+/\d+  ", line)]
    logged = [json.loads(line) for line in (tmp_path / "micro" / "metrics.jsonl").read_text().splitlines()]
    assert [line.split()[1:3] for line in steps] == [[r["phase"], f"{r['step']}/{4 if r['phase'] == 'sft' else 3}"]
                                                    for r in logged]
    assert all(line.startswith("[grpo] ") for line in lines), lines
