#!/usr/bin/env bash
# The reference's whole run, timed as tutorial_run.sh times ours: TRL SFTTrainer with the tutorial's
# SFTConfig, 10 epochs of the 720 yoda rows, from process start to the saved adapter, on a saved
# random-weight checkpoint. `source .gpu/env.sh && bash benchmarks/lab/sft_tutorial_run.sh CHECKPOINT`
# writes result.jsonl (bench_sft.py's figures) and wall.json under $OUT.
set -euo pipefail
out=${OUT:-/tmp/sft_tutorial_run}
mkdir -p "$out"
start=$(date +%s)
python benchmarks/bench_sft.py --whole-run --model "$1" --json "$out/result.jsonl" --name sft-whole-run > "$out/run.log" 2>&1 \
  || { tail -c 3000 "$out/run.log"; exit 1; }
echo "{\"wall_s\": $(( $(date +%s) - start ))}" > "$out/wall.json"
cat "$out/wall.json"
