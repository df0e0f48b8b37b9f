#!/usr/bin/env bash
# Call 3: the new defaults on the GPU (--fp8-matmuls and --seeded-dropout auto: on in the fast path,
# FP8 on Hopper only). The GPU suite (its defaults test checks what auto settled on), then the
# README's plain command, the whole tutorial run with held-out evaluation (benchmarks/tutorial_run.sh).
# `source .gpu/env.sh && bash benchmarks/results/h200_levers/call3.sh`; at most 8 files under $OUT.
set -uo pipefail
T=$YODA_RAW_DATA/phi3-mini-4k-instruct
python -c "from benchmarks import common; common.save_random_checkpoint('$T', '/tmp/phi3_random')" > /dev/null 2>&1
YODA_RAW_GPU_REPORT="$OUT/gpu_report.json" YODA_RAW_PHI3_CHECKPOINT=/tmp/phi3_random \
  timeout 330 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$OUT/gpu_suite.log" 2>&1
OUT="$OUT/tutorial_run" timeout 200 bash benchmarks/tutorial_run.sh > "$OUT/tutorial_run.log" 2>&1
