#!/usr/bin/env bash
# CI for the vLLM rollout engine: set up .venv-vllm (scripts/setup_vllm_env.sh), then run tests/rollout/vllm in it.
#
# Fails on a failing test, on no test collected (pytest's exit 5) and on a skipped module: GRPO_REQUIRE_VLLM=1
# turns tests/rollout/vllm's "vLLM is not importable" skip into an error. One OpenMP thread: the test models are tiny, and
# on a 2-core machine two spinning threads per op ran the tests 2x slower (88 s against 40 s) than one.
# From scratch: about 1.5 minutes of setup plus 1 to 1.5 minutes of tests; with the environment in place, ~45 s.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind} VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 GRPO_REQUIRE_VLLM=1
start=$SECONDS
bash scripts/setup_vllm_env.sh
.venv-vllm/bin/python -m pytest -q -p no:cacheprovider -W ignore::FutureWarning tests/rollout/vllm
echo "[ci-vllm] setup + tests took $((SECONDS - start)) s"
