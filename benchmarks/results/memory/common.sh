# What every device call of this folder does first (sourced by call10.sh and later): the versions
# into $R/env.txt, the random-init Phi-3-mini saved once to $CK, and `bench` (one bench_loop.py run
# in its own process, its result appended to $R/loop.jsonl, skipped once $SECONDS passes $STOP_AT).
# The caller sets R (a folder under /tmp, named after the call), STOP_AT, and then calls `summary`.
set -u
mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader > "$R/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$R/env.txt"
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$R/loop.log" 2>&1
B="--model $CK --init pretrained --tokenizer $TOK --peaks-by-step"
S512="--batch-size 16 --max-length 512 --warmup 3 --steps 6"
S64="--batch-size 16 --max-length 64 --warmup 3 --steps 8"

bench() {
  ((SECONDS < STOP_AT)) || { echo "skipped for time: $*" | tee -a "$R/loop.log"; return; }
  timeout 120 python benchmarks/bench_loop.py $B --json "$R/loop.jsonl" "$@" >> "$R/loop.log" 2>&1 ||
    echo "exit $? for $*" | tee -a "$R/loop.log"
}

summary() {  # the runs of $R/loop.jsonl, a line each, with the first steps' peaks, into $R/summary.txt
  python - "$R/loop.jsonl" > "$R/summary.txt" <<'PY'
import json, sys
print(f"{'name':42} {'tok/s':>8} {'alloc':>6} {'resv':>6} {'nvml':>6} {'proc':>6}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['name']:42} {r['tokens_per_s']:8.0f} {r['peak_allocated_gib']:6.3f} {r['peak_reserved_gib']:6.3f} "
          f"{r.get('device_used_gib') or 0:6.2f} {r.get('process_used_gib') or 0:6.2f}")
    for s in r.get("peaks_by_step", [])[:3]:
        print(f"    step {s['step']}: alloc {s['peak_allocated_gib']:.3f} resv {s['peak_reserved_gib']:.3f} "
              f"nvml {s.get('device_used_gib')} proc {s.get('process_used_gib')}")
PY
  cat "$R/summary.txt"
}
