#!/usr/bin/env bash
# One GPU session's evidence in one call (2 GPUs): GPU tests of the kernels, the 2-GPU NCCL
# training test and a torchrun run of `fastlego train`, the skipping sampling-time test, and
# `fastlego bench --quick`. Logs and reports land in $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/env.txt"
python3 -m pytest -q -m cuda -p no:cacheprovider -rfE tests/test_kernel_brick_embed.py tests/test_model_triton.py \
  tests/test_kernel_fused_linear.py -k "not every_config" 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"
python3 -m pytest -q -s -m cuda -p no:cacheprovider -rfEs tests/test_training.py tests/test_sampling.py 2>&1 \
  | grep -E "\[sampling\]|passed|failed|SKIP|Error" | tee -a "$OUT/gpu_tests.log"
timeout 120 torchrun --standalone --nproc_per_node 2 -m fastlego train --preset lego_S_PG_64 --resolution 64 \
  --batch 128 --steps 40 --precision bf16 --outdir "$OUT/ddp" --log-every 10 2>&1 | tail -6 | tee "$OUT/torchrun.log"
rm -f "$OUT"/ddp/*.pt
cp bench/RESULTS.md "$OUT/RESULTS.md"
timeout -s TERM "${BENCH_SECONDS:-400}" python3 -m fastlego bench --quick --json "$OUT/bench.json" \
  --markdown "$OUT/RESULTS.md" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -A6 "^| preset (batch) | floor" "$OUT/RESULTS.md" | tail -5
