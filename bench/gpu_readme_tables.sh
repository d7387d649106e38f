#!/usr/bin/env bash
# The README's benchmark tables from a fresh run, on one CUDA GPU (about 8 minutes with compiles):
#   bash bench/gpu_readme_tables.sh           -> bench/results/{infer,train}.json, logs under ${OUT:-out}/
# then, where the JSON came back: python3 bench/readme_tables.py --write bench/results/infer.json bench/results/train.json
# Inference: the three default workloads, fp32 weights under bf16 autocast and bf16 weights, each
# against the reference eager and torch.compile of it. Training: the workloads that fit 80 GB
# with the eager reference beside them. INFER_S / TRAIN_S bound each part (seconds; SIGINT, so a
# cut run still writes what it measured).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/env.txt"
timeout -s INT "${INFER_S:-300}" python3 -m fastlego bench --quick \
  --variants reference,fastlego,fastlego_bf16,compile,reference_bf16,compile_bf16 \
  --json bench/results/infer.json --markdown "$OUT/infer.md" > "$OUT/bench_infer.log" 2>&1
echo "infer rc=$?"
timeout -s INT "${TRAIN_S:-240}" python3 -m fastlego bench --modes train --quick \
  --presets "${TRAIN_PRESETS:-lego_S_PG_64:64,lego_S_PG_64:256,lego_L_PG_64:64}" \
  --variants reference,fastlego,fastlego_graph,compile --json bench/results/train.json \
  --markdown "$OUT/train.md" > "$OUT/bench_train.log" 2>&1
echo "train rc=$?"
cp bench/results/*.json "$OUT/" 2>/dev/null
python3 bench/readme_tables.py bench/results/infer.json bench/results/train.json 2>&1 | tee "$OUT/tables.md"
