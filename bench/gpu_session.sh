#!/usr/bin/env bash
# The evidence a GPU session records, cheapest first, in one call on a 2-GPU machine:
#   1. `fastlego train` through torchrun on 2 GPUs, and the 2-GPU NCCL-vs-one-GPU test;
#   2. sampling time with and without brick skipping (the test prints both times);
#   3. `fastlego bench --quick` (reference eager, torch.compile, fastlego, the floor) -> RESULTS.md.
# GPU kernel tests are separate (bench/gpu_tests.sh): with compiles and autotuning they take
# several minutes on a fresh machine. Logs and reports land in $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
{ date -u; nvidia-smi --query-gpu=name --format=csv,noheader; } | tee "$OUT/env.txt"
timeout 150 torchrun --standalone --nproc_per_node 2 -m fastlego train --preset lego_S_PG_64 --resolution 64 \
  --batch 128 --steps 40 --precision bf16 --outdir "$OUT/ddp" --log-every 10 2>&1 | tail -6 | tee "$OUT/torchrun.log"
rm -f "$OUT"/ddp/*.pt
timeout 200 python3 -m pytest -q -s -m cuda -p no:cacheprovider -rfEs tests/test_training.py::test_ddp_nccl_two_gpus_equal_one_gpu \
  tests/test_sampling.py::test_skipping_saves_time_on_gpu 2>&1 | grep -E "\[sampling\]|passed|failed|SKIP|Error" \
  | tee "$OUT/pipeline_tests.log"
cp bench/RESULTS.md "$OUT/RESULTS.md"
[ "${BENCH_SECONDS:-400}" = 0 ] && exit 0   # BENCH_SECONDS=0: pipeline records only
timeout -s TERM "${BENCH_SECONDS:-400}" python3 -m fastlego bench --quick --json "$OUT/bench.json" \
  --markdown "$OUT/RESULTS.md" > "$OUT/bench.log" 2>&1
echo "bench rc=$?"
grep -A6 "^| preset (batch) | floor" "$OUT/RESULTS.md" | tail -5
