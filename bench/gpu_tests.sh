#!/usr/bin/env bash
# Run the GPU tests on a CUDA machine; logs under ${OUT:-out}/.
#   bash bench/gpu_tests.sh [pytest args]   cuda-marked kernel tests, then every other cuda-marked test
# (unmarked tests use CPU tensors and Triton's interpreter: they belong to the CPU run)
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
python3 -m fastlego info 2>&1 | tee "$OUT/info.txt"
KERNEL_TESTS="$(ls tests/test_kernel_*.py) tests/test_attention_backends.py tests/test_model_triton.py"
python3 -m pytest -q -rfE -p no:cacheprovider --durations=10 -m cuda $KERNEL_TESTS "$@" 2>&1 | tee "$OUT/gpu_kernel_tests.log"
rc1=${PIPESTATUS[0]}
python3 -m pytest -q -rfE -p no:cacheprovider -m cuda $(ls tests/test_*.py | grep -v -e test_kernel_ -e test_attention_backends -e test_model_triton) 2>&1 | tee "$OUT/gpu_other_tests.log"
rc2=${PIPESTATUS[0]}
echo "kernel tests rc=$rc1, other cuda tests rc=$rc2"
[ "$rc1" = 0 ] && [ "$rc2" = 0 ]
