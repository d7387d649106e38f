#!/usr/bin/env bash
# Run the CUDA-marked tests (and the rest of the suite) on a GPU machine; logs under ${OUT:-out}/.
# Usage: bash bench/gpu_tests.sh [pytest args...]
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
python3 -m fastlego info 2>&1 | tee "$OUT/info.txt"
python3 -m pytest -q -m cuda -rfs --durations=15 "$@" tests 2>&1 | tee "$OUT/gpu_tests.log"
exit "${PIPESTATUS[0]}"
