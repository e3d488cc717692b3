#!/usr/bin/env bash
# Create ./.venv and install the toolkit with its test extras.
#
# Installs the CPU build of torch first when no torch is present, so that resolving the toolkit's
# dependencies never pulls a multi-GB CUDA build onto a CPU machine. On a GPU machine, install the
# torch build you want into the venv first (or set GRPO_TORCH_SPEC) and this script keeps it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${GRPO_TORCH_SPEC:-torch==2.13.0}
EXTRAS=${GRPO_EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] installing $TORCH_SPEC"
    "$PY" -m pip install --quiet "$TORCH_SPEC"
fi
echo "[bootstrap] installing grpo-toolkit[$EXTRAS]"
"$PY" -m pip install --quiet -e ".[$EXTRAS]"
"$PY" -c "import torch, transformers; print(f'[bootstrap] torch {torch.__version__}, transformers {transformers.__version__}')"
