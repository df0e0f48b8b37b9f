#!/usr/bin/env bash
# Device call 2 (2026-12-07): call 1 again with the offloading fixed (call 1 moved nothing: it took
# "cuda" and "cuda:0" for different devices), then the rows of 4,096 tokens that fit 6 and 24 GiB
# cards with it, then 8 and 12 GiB with the time left.
#   source .gpu/env.sh && bash benchmarks/results/memory/call2.sh      (carry .gpu)
set -u
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$OUT/env.txt"
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$OUT/loop.log" 2>&1
M="--model $CK --init pretrained --tokenizer $TOK --warmup 4 --steps 12 --json $OUT/loop.jsonl"
bench() { timeout 150 python benchmarks/bench_loop.py $M "$@" >> "$OUT/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$OUT/loop.log"; }
bench --batch-size 16 --max-length 512 --breakdown --offload-activations on --name offload-16x512
bench --batch-size 16 --max-length 512 --breakdown --name defaults-16x512
bench --batch-size 16 --max-length 64 --offload-activations on --name offload-16x64
bench --batch-size 16 --max-length 64 --name defaults-16x64
bench --batch-size 1 --max-length 4096 --warmup 3 --steps 6 --offload-activations on --name offload-1x4096
YODA_RAW_PHI3_CHECKPOINT=$CK YODA_RAW_GPU_REPORT="$OUT/gpu_test.json" timeout 200 python -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_gpu.py -k offloaded > "$OUT/gpu_test.log" 2>&1
echo "GPU test exit $? at ${SECONDS} s" | tee "$OUT/summary.txt"
tail -n 3 "$OUT/gpu_test.log" | tee -a "$OUT/summary.txt"
python - "$OUT/loop.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
print(f"{'name':<18} {'tokens/s':>9} {'step ms':>8} {'peak alloc':>10} {'reserved':>9} {'NVML peak':>9} {'loss first/last':>18}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    nvml = r.get("device_used_peak_gib") or r.get("device_used_gib") or 0
    print(f"{r['name']:<18} {r['tokens_per_s']:>9,.0f} {1000 * r['step_s']:>8.1f} {r['peak_allocated_gib']:>10.3f} "
          f"{r['peak_reserved_gib']:>9.3f} {nvml:>9.3f} {r['loss_first']:>9.5f}/{r['loss_last']:.5f}")
PY
C="--model $CK --init pretrained --tokenizer $TOK --offload-activations on --warmup 2 --steps 3 --json $OUT/cards.jsonl"
C="$C --card-tokens 4096 --max-rows 16 --max-probes 3 --card-prior 4.6,0.00019"
for CARDS in 6,24 8,12; do
  LEFT=$((585 - SECONDS))
  ((LEFT > 90)) || break
  timeout $LEFT python benchmarks/bench_loop.py $C --cards $CARDS --time-budget-s $((LEFT - 80)) >> "$OUT/cards.log" 2>&1
done
python - "$OUT/cards.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); c = r["card"]
    print(f"card {c['card_gib']:g} GiB: {c['rows_fit']} rows of {c['tokens_per_row']} fit (NVML peak "
          f"{r.get('device_used_peak_gib')}, not fit: {c['rows_not_fit']}); probes "
          + ", ".join(f"{p['rows']}:{p['device_used_peak_gib']}" for p in c["probes"]))
PY
echo "done at ${SECONDS} s" | tee -a "$OUT/summary.txt"
