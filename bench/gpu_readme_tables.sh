#!/usr/bin/env bash
# The README's benchmark tables from a fresh run, on one CUDA GPU, in parts (each a separate
# call fits a 10-minute limit; torch.compile's caches make a second part on the same machine faster):
#   bash bench/gpu_readme_tables.sh [PART ...]     PART: infer, train, latency, tables (default: all four)
#     infer   -> bench/results/infer${TAG}.json     the default workloads (or $INFER_PRESETS), fp32 weights
#                under bf16 autocast and bf16 weights: reference eager, fastlego, and torch.compile of the
#                reference three ways (default mode, max-autotune-no-cudagraphs, compiled + CUDA graph)
#     train   -> bench/results/train${TAG}.json     training steps ($TRAIN_PRESETS): reference eager, fastlego,
#                fastlego_graph, and compile / compile_max_autotune / compile_graph (the compiled step as
#                one CUDA graph), all with fused AdamW
#     latency -> bench/results/latency${TAG}.json   ms per network call, lego_S_PG_64 and lego_L_PG_64 at
#                batches 1, 4, 16 (or $LATENCY_PRESETS): reference eager, compile_graph (compiled + CUDA graph),
#                fastlego eager, fastlego_graph (its forward as one CUDA graph)
#     tables  -> prints the README tables from every bench/results/{infer,train,latency}*.json
# Logs and copies of the JSON go under ${OUT:-out}/. Then, where the JSON came back:
#   python3 bench/readme_tables.py --write bench/results/infer*.json bench/results/train*.json bench/results/latency*.json
# INFER_S / TRAIN_S / LATENCY_S bound each part (seconds, default 570; SIGINT, so a cut run still
# writes what it measured); COMPILE_BUDGET_S is the bench's --compile-budget (a compile variant
# whose first call takes longer is marked "did not compile within the budget"); TAG names the JSON
# of a part run for some presets only (e.g. TAG=-L INFER_PRESETS=lego_L_PG_64:128); INFER_ARGS /
# TRAIN_ARGS / LATENCY_ARGS add `fastlego bench` options to a part (e.g. INFER_ARGS=--no-kernels).
set -uo pipefail
OUT=${OUT:-out}; TAG=${TAG:-}; mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
BUDGET=${COMPILE_BUDGET_S:-300}
PARTS=("$@"); [ ${#PARTS[@]} -eq 0 ] && PARTS=(infer train latency tables)
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
for part in "${PARTS[@]}"; do
  case "$part" in
    infer)
      timeout -s INT "${INFER_S:-570}" python3 -m fastlego bench --quick --compile-budget "$BUDGET" \
        ${INFER_PRESETS:+--presets "$INFER_PRESETS"} ${INFER_ARGS:-} \
        --variants reference,fastlego,fastlego_bf16,compile,compile_max_autotune,compile_graph,reference_bf16,compile_bf16 \
        --json "bench/results/infer$TAG.json" --markdown "$OUT/infer$TAG.md" > "$OUT/bench_infer$TAG.log" 2>&1
      echo "infer rc=$?" ;;
    train)
      timeout -s INT "${TRAIN_S:-570}" python3 -m fastlego bench --modes train --quick --compile-budget "$BUDGET" \
        --presets "${TRAIN_PRESETS:-lego_S_PG_64:64,lego_S_PG_64:256,lego_L_PG_64:64}" ${TRAIN_ARGS:-} \
        --variants reference,fastlego,fastlego_graph,compile,compile_max_autotune,compile_graph \
        --json "bench/results/train$TAG.json" --markdown "$OUT/train$TAG.md" > "$OUT/bench_train$TAG.log" 2>&1
      echo "train rc=$?" ;;
    latency)
      timeout -s INT "${LATENCY_S:-570}" python3 -m fastlego bench --modes latency --quick --compile-budget "$BUDGET" \
        ${LATENCY_PRESETS:+--presets "$LATENCY_PRESETS"} ${LATENCY_ARGS:-} \
        --variants reference,compile_graph,fastlego,fastlego_graph \
        --json "bench/results/latency$TAG.json" --markdown "$OUT/latency$TAG.md" > "$OUT/bench_latency$TAG.log" 2>&1
      echo "latency rc=$?" ;;
    tables)
      cp bench/results/*.json "$OUT/" 2>/dev/null
      reports=$(ls bench/results/infer*.json bench/results/train*.json bench/results/latency*.json 2>/dev/null)
      if [ -n "$reports" ]; then
        python3 bench/readme_tables.py $reports 2>&1 | tee "$OUT/tables.md"
      else
        echo "tables: no bench/results/{infer,train,latency}*.json yet"
      fi ;;
    *) echo "unknown part '$part': expected infer, train, latency or tables" >&2; exit 2 ;;
  esac
done
