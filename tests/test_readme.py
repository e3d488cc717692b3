"""The README runs: every ``bash`` and ``python`` block, top to bottom in one working folder, as a user following it.

* A ``python`` block whose first line is ``# NAME.py`` is saved as that file in the working folder (the next
  blocks use it); every ``python`` block is then run with the toolkit installed.
* A ``bash`` block runs as one ``bash`` script, each line a command (``\\`` continues a line, ``#`` starts a
  comment), with this environment's ``bin`` folder first on ``PATH`` and a ``HOME`` of its own (a fresh
  machine's, with this machine's pip configuration); every command must exit 0.
* A ``text`` block that starts with ``$ COMMAND`` is that command's output: the command runs and must print it.

What the README cannot hold runs as a stand-in, each one listed here:

* :data:`PLACEHOLDERS`: model folders (``/models/...``) are tiny models of the same kind built by the test,
  ``NODE1_IP`` is this machine, ``/tmp/runs`` a folder of the test's own.
* :data:`STAND_INS`: after ``grpo run|sft|rl|rm RECIPE`` come overrides that shrink the recipe's model, data and
  steps to seconds of CPU (the README's own overrides follow them, so they still apply). A GPU cluster recipe
  also gets the CPU engine, device and dtype, since neither CUDA nor vLLM is here.
* The README's test command runs with ``--collect-only``: the suite it names is the one running this test.
* ``.venv/`` is this environment, and ``scripts/bootstrap.sh`` installs into it (``VENV``): it finds the project
  installed and reinstalls it in place.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ray.util import get_node_ip_address

from grpo.data import tasks
from model import DeepSeekConfig, DeepSeekForCausalLM, build_tokenizer
from tests.helpers import ROOT
from tests.helpers.hf_models import llama_folder
from tests.helpers.recipes import TINY_MODEL

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
BIN = Path(sys.executable).parent

MICRO_GRPO = ("grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.minibatch_size=4", "grpo.micro_batch_size=4",
              "grpo.max_new_tokens=8")
TINY = [
    "model.overrides=" + json.dumps(TINY_MODEL["overrides"]),
    'sft.data=[{source: "builtin:arithmetic", schema: sft, n: 32}, '
    '{source: "builtin:safety", schema: sft, n: 16, completion_column: chosen}]',
    "sft.train.epochs=1", "sft.train.log_every=1",
    "rl_reason.steps=2", "rl_reason.data.n=32", *(f"rl_reason.{o}" for o in MICRO_GRPO),
    *(f"rm.models.{m}.{d}.n={n}" for m in ("helpful", "safety") for d, n in (("data", 16), ("eval_data", 8))),
    "rl_pref.steps=2", "rl_pref.data.n=16", *(f"rl_pref.{o}" for o in MICRO_GRPO),
    "eval.data.n=8", "eval.pref_data.n=4", "eval.pref_samples=2", "eval.max_new_tokens=8",
]
STAND_INS = {
    "tiny": TINY,
    "my_recipe.yaml": TINY,
    "hf_grpo": ["rl_reason.steps=2", *(f"rl_reason.{o}" for o in MICRO_GRPO), "eval.max_new_tokens=8"],
    "deepseek_v2_lite": [
        "model.dtype=float32", "model.master_dtype=null", "model.device=cpu", "model.gradient_checkpointing=false",
        "offload=disk", "ray.num_rollout_workers=1", "ray.rollout_cpus=0.5", "ray.weight_transport=object_store",
        'sft.data=[{source: "builtin:arithmetic", schema: sft, n: 16}]',
        "sft.train={epochs: 1, batch_size: 8, max_length: 64}",
        *(f"{s}.{k}" for s in ("rl_reason", "rl_pref") for k in (
            "steps=1", "engine=torch", 'data={source: "builtin:arithmetic", n: 16}', *MICRO_GRPO)),
        *(f"rm.models.{m}.{k}" for m in ("helpful", "safety") for k in (
            'data={source: "builtin:helpfulness", schema: preference, n: 16}',
            "train={epochs: 1, batch_size: 8, max_length: 64, device: cpu}")),
        'eval.data={source: "builtin:arithmetic", split: test, n: 4}',
        'eval.pref_data={source: "builtin:safety", split: test, n: 2}', "eval.max_new_tokens=8",
        "eval.pref_samples=1",
    ],
}
OPTIONS_WITH_VALUES = {"--stage", "--device-memory", "--prompt-tokens"}


def blocks() -> list[tuple[int, str, str]]:
    """``(line, language, text)`` of every fenced block of the README, in order."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1), m.group(2)) for m in FENCE.finditer(text)]


OPERATORS = {"&&", "||", "|", ";"}


def shell_lines(block: str) -> list[list[str]]:
    """The commands of a bash block as shell words (operators such as ``&&`` are words of their own):
    continuations joined, comments and blank lines dropped."""
    out = []
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words = list(lexer)
        if words:
            out.append(words)
    return out


def with_stand_ins(words: list[str]) -> str:
    """The command line of ``words``, each ``grpo run|sft|rl|rm [RECIPE]`` followed by its recipe's stand-in
    overrides (:data:`STAND_INS`)."""
    out: list[str] = []
    start = 0
    for end in [*(i for i, w in enumerate(words) if w in OPERATORS), len(words)]:
        command = words[start:end]
        if len(command) > 1 and Path(command[0]).name == "grpo" and command[1] in ("run", "sft", "rl", "rm"):
            i, recipe = 2, "tiny"
            while i < len(command) and command[i].startswith("--"):
                i += 2 if command[i] in OPTIONS_WITH_VALUES else 1
            if i < len(command) and "=" not in command[i]:
                recipe, i = command[i], i + 1
            command = [*command[:i], *STAND_INS[recipe], *command[i:]]
        out += [shlex.quote(w) for w in command] + ([words[end]] if end < len(words) else [])
        start = end + 1
    return " ".join(out)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The user's folder, and the substitutions that make the README's placeholders real."""
    root = tmp_path_factory.mktemp("readme")
    (root / "data").mkdir()
    for split, n in (("train", 16), ("test", 4)):
        rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in tasks.generate("arithmetic", n, seed=3,
                                                                                       split=split)]
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(ROOT / "grpo" / "recipes" / "tiny.yaml", root / "my_recipe.yaml")
    llama = llama_folder(root / "models" / "llama")
    tok = build_tokenizer()
    cfg = DeepSeekConfig.from_preset("tiny", vocab_size=len(tok), **TINY_MODEL["overrides"])
    DeepSeekForCausalLM(cfg).save_pretrained(root / "models" / "deepseek", tokenizer=tok)
    placeholders = {
        "/models/my-model": str(llama), "/models/SmolLM2-135M-Instruct": str(llama),
        "/models/DeepSeek-V2-Lite-Chat": str(root / "models" / "deepseek"),
        "NODE1_IP": get_node_ip_address(), "/tmp/runs": str(root / "tmp-runs"),
        ".venv/bin/": f"{BIN}/", "-m pytest -q tests": f"-m pytest -q --collect-only {ROOT / 'tests'}",
        "bash scripts/bootstrap.sh": f"bash {ROOT}/scripts/bootstrap.sh",
    }
    (root / "home").mkdir()
    pip_config = Path.home() / ".config" / "pip"  # where this machine's package index is configured, if there
    if pip_config.is_dir():
        shutil.copytree(pip_config, root / "home" / ".config" / "pip")
    yield root, placeholders
    # the README's cluster block started one on this machine
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env={**_env(root), "RAY_AUTH_MODE": "token"},
                   capture_output=True, timeout=120)


def _env(root: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "HOME": str(root / "home"),
            "VENV": str(Path(sys.prefix)), "PYTHONPATH": ""}  # the toolkit as installed, as a user has it


def _run(command: str, root: Path, timeout: int = 900) -> str:
    proc = subprocess.run(["bash", "-c", command], cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, (f"README commands failed ({proc.returncode}):\n{command}\n--- stdout ---\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-5000:]}")
    return proc.stdout


def _substituted(text: str, placeholders: dict[str, str]) -> str:
    for old, new in placeholders.items():
        text = text.replace(old, new)
    return text


BLOCKS = [b for b in blocks() if b[1] in ("bash", "python") or (b[1] == "text" and b[2].startswith("$ "))]


def test_the_readme_has_the_blocks_this_test_runs():
    languages = [lang for _, lang, _ in blocks()]
    assert languages.count("bash") >= 6 and languages.count("python") >= 3
    assert all(lang in ("bash", "python", "text", "") for lang in languages), languages


@pytest.mark.slow
@pytest.mark.parametrize("line, language, text", BLOCKS, ids=[f"README.md:{b[0]}-{b[1]}" for b in BLOCKS])
def test_readme_block_runs(workspace, line, language, text):
    root, placeholders = workspace
    if language == "python":
        first = text.splitlines()[0]
        name = re.fullmatch(r"# (\w+\.py)", first)
        path = root / (name.group(1) if name else f"readme_{line}.py")
        path.write_text(text)
        _run(f"{shlex.quote(sys.executable)} {shlex.quote(str(path))}", root)
    elif language == "text":  # "$ COMMAND" then what it prints
        command, _, expected = text.partition("\n")
        printed = _run(_substituted(command.removeprefix("$ "), placeholders), root)
        assert printed == expected, f"README.md:{line}: the output of `{command}` changed:\n{printed}"
    else:
        lines = [with_stand_ins(words) for words in shell_lines(_substituted(text, placeholders))]
        _run("set -euxo pipefail\n" + "\n".join(lines), root)
