"""The toolkit as users install it: a wheel in a fresh virtual environment finds its bundled recipes."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.cli import run


@pytest.mark.slow
def test_the_wheel_ships_its_recipes(tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)])
    wheel = next(dist.glob("grpo_toolkit-*.whl"))
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    # the toolkit's dependencies come from this environment; the toolkit itself only from the wheel
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], env=env, cwd=tmp_path)
    listed = run([str(fresh / "bin" / "grpo"), "recipes"], env=env, cwd=tmp_path).stdout
    assert {"tiny", "hf_grpo", "deepseek_v2_lite"} <= {line.split()[0] for line in listed.splitlines()}
    code = ("import grpo; from grpo.orchestration.recipe import load_recipe; r = load_recipe('tiny'); "
            "print(grpo.__file__, r.name, r.rl_reason.steps)")
    out = run([str(python), "-c", code], env=env, cwd=tmp_path).stdout.split()
    assert out[0].startswith(str(fresh)) and out[1:] == ["tiny", "160"]
    run([str(fresh / "bin" / "grpo"), "run", "--help"], env=env, cwd=tmp_path)
