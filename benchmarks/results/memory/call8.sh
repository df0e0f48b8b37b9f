#!/usr/bin/env bash
# Call 8 (2026-12-07): where the peak is. Each step's own peaks (is it the warm-up's, the capture's
# or every step's?) and this process's own NVML share; a snapshot of the warm-up and the capture
# without stacks (the SystemError of item 48 came from gathering them), and one of the capture with
# them; the chunked loss's chunk size; expandable segments at 16 x 64; with the time left, a 6 GiB
# card's rows of 512 and of 4,096 with offloading and a budget of 0.5 (next step 20).
#   source .gpu/env.sh && bash benchmarks/results/memory/call8.sh      (carry .gpu)
set -u
R=/tmp/call8; mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$R/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$R/env.txt"
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$R/loop.log" 2>&1
B="--model $CK --init pretrained --tokenizer $TOK"
bench() { ((SECONDS < 450)) || { echo "skipped for time: $*" | tee -a "$R/loop.log"; return; }; timeout 120 python benchmarks/bench_loop.py $B --json $R/loop.jsonl "$@" >> "$R/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$R/loop.log"; }
L="--offload-activations on --compile-memory-budget 0.5"
S512="--batch-size 16 --max-length 512 --warmup 3 --steps 6"
S64="--batch-size 16 --max-length 64 --warmup 3 --steps 8"
bench $S512 $L --peaks-by-step --breakdown --name lever-16x512
bench $S64 --peaks-by-step --breakdown --name defaults-16x64
# Snapshots: the warm-up and the capture without stacks; then the capture with Python stacks.
bench --batch-size 16 --max-length 512 --warmup 1 --steps 1 $L --snapshot $R/s512_nostacks.pickle \
  --snapshot-steps 1-2 --snapshot-stacks none --snapshot-entries 400000 --name snap-nostacks-16x512
python benchmarks/lab/peak_tensors.py $R/s512_nostacks.pickle --blocks 40 > "$R/peak_nostacks.txt" 2>&1
bench --batch-size 16 --max-length 512 --warmup 1 --steps 1 $L --snapshot $R/s512_capture.pickle \
  --snapshot-steps 2-2 --snapshot-entries 400000 --name snap-capture-16x512
python benchmarks/lab/peak_tensors.py $R/s512_capture.pickle --blocks 40 --top 30 > "$R/peak_capture.txt" 2>&1
bench $S64 $L --peaks-by-step --name lever-16x64
bench $S64 $L --peaks-by-step --loss-chunk 256 --name lever-chunk256-16x64
bench $S512 $L --peaks-by-step --loss-chunk 256 --name lever-chunk256-16x512
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
bench $S64 $L --peaks-by-step --name lever-expandable-16x64
unset PYTORCH_CUDA_ALLOC_CONF
# The first steps' time (compiling, the capture) with an empty compile cache, again with the cache
# the first run left (a user's second run), without pointwise autotuning, and with 8 compile threads.
C=/tmp/call8_inductor; S64S="--batch-size 16 --max-length 64 --warmup 2 --steps 3"
TORCHINDUCTOR_CACHE_DIR=$C/a bench $S64S --name startup-cold-16x64
TORCHINDUCTOR_CACHE_DIR=$C/a bench $S64S --name startup-warm-cache-16x64
TORCHINDUCTOR_CACHE_DIR=$C/b bench $S64S --inductor triton.autotune_pointwise=False --name startup-cold-noautotune-16x64
TORCHINDUCTOR_CACHE_DIR=$C/c TORCHINDUCTOR_COMPILE_THREADS=8 bench $S64S --name startup-cold-8threads-16x64
rm -f $R/*.pickle  # large; the tables above are what is kept
python - "$R/loop.jsonl" > "$R/summary.txt" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'name':28} {'tok/s':>8} {'alloc':>6} {'resv':>6} {'nvml':>6} {'proc':>6}")
for r in rows:
    print(f"{r['name']:28} {r['tokens_per_s']:8.0f} {r['peak_allocated_gib']:6.3f} {r['peak_reserved_gib']:6.3f} "
          f"{r.get('device_used_gib') or 0:6.2f} {r.get('process_used_gib') or 0:6.2f}  first steps {r.get('warmup_steps_s')}")
    for s in r.get("peaks_by_step", [])[:4]:
        print(f"    step {s['step']}: alloc {s['peak_allocated_gib']:.3f} resv {s['peak_reserved_gib']:.3f} "
              f"nvml {s.get('device_used_gib')} proc {s.get('process_used_gib')}")
PY
cat "$R/summary.txt" "$R/peak_nostacks.txt" "$R/peak_capture.txt"
LEFT=$((565 - SECONDS))
if ((LEFT > 90)); then
  timeout $LEFT python benchmarks/bench_loop.py $B $L --warmup 2 --steps 3 --json "$R/cards.jsonl" --cards 6 \
    --card-tokens 512,4096 --known-fit 512:8,4096:1 --max-probes 2 --time-budget-s $((LEFT - 70)) >> "$R/cards.log" 2>&1
  python -c "
import json
for line in open('$R/cards.jsonl'):
    c = json.loads(line)['card']
    print('card', c['card_gib'], 'x', c['tokens_per_row'], 'fit', c['rows_fit'], 'not', c['rows_not_fit'], [(p['rows'], p['fits'], p['device_used_peak_gib']) for p in c['probes']])
" | tee -a "$R/summary.txt"
fi
cp "$R/summary.txt" "$OUT/" 2>/dev/null; tar -C /tmp -czf "$OUT/call8.tar.gz" call8
echo "done at ${SECONDS} s"
