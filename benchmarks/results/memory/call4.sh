#!/usr/bin/env bash
# Device call 4 (2026-12-07): with the device time left, call 2's card search for 8 and 12 GiB
# cards (rows of 4,096 tokens, --offload-activations on), its first guess fitted to call 2's probes.
#   source .gpu/env.sh && bash benchmarks/results/memory/call4.sh      (carry .gpu)
set -u
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/env.txt"
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
[ -f $CK/config.json ] || python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$OUT/cards.log" 2>&1
C="--model $CK --init pretrained --tokenizer $TOK --offload-activations on --warmup 2 --steps 3 --json $OUT/cards.jsonl"
C="$C --card-tokens 4096 --max-rows 16 --max-probes 3 --card-prior 4.25,0.000252 --known-fit 4096:1"
timeout $((290 - SECONDS)) python benchmarks/bench_loop.py $C --cards 8,12 --time-budget-s $((200 - SECONDS)) >> "$OUT/cards.log" 2>&1
python - "$OUT/cards.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); c = r["card"]
    print(f"card {c['card_gib']:g} GiB: {c['rows_fit']} rows of {c['tokens_per_row']} fit (NVML peak "
          f"{r.get('device_used_peak_gib')}, not fit: {c['rows_not_fit']}); probes "
          + ", ".join(f"{p['rows']}:{p['device_used_peak_gib']}" for p in c["probes"]))
PY
echo "done at ${SECONDS} s"
