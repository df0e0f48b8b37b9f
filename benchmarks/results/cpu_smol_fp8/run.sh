#!/usr/bin/env bash
# FP8 on real weights, on this project's 2-core CPU machine: the smol preset (SmolLM2-135M-Instruct,
# from `python -m yoda_raw.fetch smol`) in 4-bit NF4, one epoch (31 steps), three ways: fp32 products
# (the CPU's default precision), FP8 products (--fp8-matmuls on), and bf16 autocast for scale (what
# a small change of rounding alone does to this run). Each ends with the held-out evaluation.
#   bash benchmarks/results/cpu_smol_fp8/run.sh DATASET.jsonl OUT
# It ends by printing each run's per-step losses against the fp32 run's, and the held-out results.
set -euo pipefail
dataset=${1:?give the yoda_sentences .jsonl}
out=${2:?give an output folder}
common=(--preset smol --dataset "$dataset" --quant nf4 --logging-steps 1 --overwrite)
/usr/bin/time -v python run.py "${common[@]}" --fp8-matmuls off --output-dir "$out/out_off" > "$out/run_off.log" 2>&1
/usr/bin/time -v python run.py "${common[@]}" --fp8-matmuls on --output-dir "$out/out_on" > "$out/run_on.log" 2>&1
/usr/bin/time -v python run.py "${common[@]}" --fp8-matmuls off --precision bf16 --output-dir "$out/out_bf16" \
  > "$out/run_bf16.log" 2>&1
python - "$out" <<'PY'
import json, sys
from pathlib import Path

def records(name):
    return [json.loads(line) for line in (Path(sys.argv[1]) / f"out_{name}" / "metrics.jsonl").open()]

reference = [r["loss"] for r in records("off") if "step" in r and "loss" in r]
for name in ("on", "bf16"):
    losses = [r["loss"] for r in records(name) if "step" in r and "loss" in r]
    gaps = [abs(a - b) / b for a, b in zip(losses, reference, strict=True)]
    print(f"{name}: per-step loss from fp32's: worst {max(gaps):.2%} (step {gaps.index(max(gaps)) + 1}), "
          f"mean {sum(gaps) / len(gaps):.2%} over {len(gaps)} steps")
for name in ("off", "on", "bf16"):
    last = records(name)[-1]
    print(f"{name}: held-out loss {last['eval_loss']:.4f}, chrF {last['eval_chrf']:.2f}, BLEU {last['eval_bleu']:.2f}, "
          f"exact match {last['eval_exact_match']:.1%}")
PY
