#!/usr/bin/env bash
# Call 6 (2026-12-07): what a compiled layer keeps for its backward (--compile-memory-budget), with
# offloading, at 16 x 512; cuBLAS's workspaces counted in the breakdown (and the first step's given
# back before the capture); 50 steps of losses against the defaults.
#   source .gpu/env.sh && bash benchmarks/results/memory/call6.sh      (carry .gpu)
set -u
R=/tmp/call6; mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$R/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$R/env.txt"
git log -1 --format='commit %H' >> "$R/env.txt" 2>/dev/null
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$R/loop.log" 2>&1
B="--model $CK --init pretrained --tokenizer $TOK"
bench() { ((SECONDS < 520)) || { echo "skipped for time: $*" | tee -a "$R/loop.log"; return; }; timeout 120 python benchmarks/bench_loop.py $B --json $R/loop.jsonl --breakdown "$@" >> "$R/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$R/loop.log"; }
# The breakdown's GPU test (eager and graph), first
timeout 120 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py -k breakdown > "$R/gpu_test.log" 2>&1
echo "GPU test exit $?"; tail -n 2 "$R/gpu_test.log"
S="--batch-size 16 --max-length 512 --warmup 4 --steps 12"
bench $S --name defaults-16x512
for BUDGET in 1 0.5 0.2 0; do
  bench $S --offload-activations on --compile-memory-budget $BUDGET --name offload-budget$BUDGET-16x512
done
bench --batch-size 16 --max-length 64 --warmup 4 --steps 12 --offload-activations on --compile-memory-budget 0.2 --name offload-budget0.2-16x64
# 50 steps of losses at 16 x 64: the defaults, and offloading with a budget of 0.2
bench --batch-size 16 --max-length 64 --warmup 5 --steps 45 --name losses-defaults-16x64
bench --batch-size 16 --max-length 64 --warmup 5 --steps 45 --offload-activations on --compile-memory-budget 0.2 --name losses-offload-budget0.2-16x64
# With the time left: the 6 GiB card at 512 tokens, offloading and a budget of 0.2 (5 rows fit without it)
LEFT=$((560 - SECONDS))
if ((LEFT > 100)); then
  timeout $LEFT python benchmarks/bench_loop.py $B --offload-activations on --compile-memory-budget 0.2 --warmup 2 \
    --steps 3 --json "$R/cards.jsonl" --cards 6 --card-tokens 512 --known-fit 512:5 --max-probes 3 \
    --time-budget-s $((LEFT - 60)) >> "$R/cards.log" 2>&1
fi
python - "$R/loop.jsonl" "$R/cards.jsonl" > "$R/summary.txt" <<'PY'
import json, os, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'name':34} {'tok/s':>8} {'alloc':>6} {'resv':>6} {'nvml':>6} {'ws':>6} {'mismatch':>8}")
for r in rows:
    b = r.get("memory_breakdown", {})
    print(f"{r['name']:34} {r['tokens_per_s']:8.0f} {r['peak_allocated_gib']:6.3f} {r['peak_reserved_gib']:6.3f} "
          f"{r.get('device_used_gib') or 0:6.2f} {b.get('cublas_workspaces_gib', 0):6.3f} {b.get('mismatch_after_loop_gib', 0):8.4f}")
by = {r["name"]: r["losses"] for r in rows}
a, b = by.get("losses-defaults-16x64"), by.get("losses-offload-budget0.2-16x64")
if a and b:
    worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    print(f"50 steps: worst relative loss difference {worst:.5f} over {len(a)} steps; last {a[-1]:.4f} vs {b[-1]:.4f}")
if os.path.exists(sys.argv[2]):
    for line in open(sys.argv[2]):
        c = json.loads(line)["card"]
        print("card", c["card_gib"], "x", c["tokens_per_row"], "fit", c["rows_fit"], "not", c["rows_not_fit"],
              [(p["rows"], p["fits"], p["device_used_peak_gib"]) for p in c["probes"]])
PY
cat "$R/summary.txt"
cp "$R/summary.txt" "$OUT/" 2>/dev/null; tar -C /tmp -czf "$OUT/call6.tar.gz" call6
echo "done at ${SECONDS} s"
