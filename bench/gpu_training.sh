#!/usr/bin/env bash
# Training evidence on one CUDA GPU, logs under ${OUT:-out}/:
#   bash bench/gpu_training.sh tests            GPU gradient tests: every fused op's backward (fp32/bf16/fp16),
#                                               DiT blocks at S/L/XL widths, mixed-precision training steps,
#                                               fullgraph Inductor training, determinism, opcheck on CUDA,
#                                               the Triton window-attention backward, the token-major SDPA
#                                               backend, CUDA-graph training steps and `fastlego.train` on
#                                               the GPU; + the sampling-skip timing
#   bash bench/gpu_training.sh bench PRESETS    `fastlego bench --modes train --quick` for PRESETS
#                                               (NAME:BATCH,...), appended to $OUT/RESULTS.md
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee -a "$OUT/env.txt"
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -rfE -p no:cacheprovider --durations=8 -m cuda tests/test_training_ops.py \
      tests/test_training.py tests/test_kernel_window_attention_backward.py \
      tests/test_attention_backends.py::test_sdpa_backend_equals_the_reference_values_and_gradients \
      tests/test_kernel_window_attention.py::test_cuda_auto_dispatch_picks_the_kernel_for_windows 2>&1 | tee "$OUT/gpu_training_tests.log"
    python3 -m pytest -q -s -rfE -p no:cacheprovider -m cuda tests/test_sampling.py::test_skipping_saves_time_on_gpu 2>&1 \
      | grep -E "\[sampling\]|passed|failed|Error" | tee "$OUT/sampling_skip.log" ;;
  bench)
    [ -f "$OUT/RESULTS.md" ] || cp bench/RESULTS.md "$OUT/RESULTS.md"
    timeout -s TERM "${BENCH_SECONDS:-540}" python3 -m fastlego bench --modes train --quick --presets "$2" \
      --json "$OUT/train_$(echo "$2" | tr ':,' '__').json" --markdown "$OUT/RESULTS.md" 2>&1 | tee "$OUT/bench_train.log" | tail -25 ;;
esac
