#!/usr/bin/env bash
# Call 9 (written 2026-12-07; next steps 23, 25 and 26 of NOTES.md and
# the README's table in one call). Ours at 16 x 64 and 16 x 512: the defaults; the long-row levers
# (--offload-activations on --compile-memory-budget 0.5) without and with --split-layers on; the
# small-card levers at 16 x 64 (the same and --loss-chunk 256) with expandable segments; each step's
# peaks and the process's own NVML share. A snapshot with Python stacks, checkpoints recomputed to
# their end. Then the peers (.peers/run.sh): Unsloth, and TRL's SFTTrainer with the tutorial's config.
#   source .gpu/env.sh && bash benchmarks/results/memory/call9.sh      (carry .gpu and .peers)
set -u
R=/tmp/call9; mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader > "$R/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$R/env.txt"
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$R/loop.log" 2>&1
B="--model $CK --init pretrained --tokenizer $TOK --warmup 4 --steps 10 --peaks-by-step"
bench() { timeout 120 python benchmarks/bench_loop.py $B --json $R/loop.jsonl "$@" >> "$R/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$R/loop.log"; }
LONG="--offload-activations on --compile-memory-budget 0.5"
bench --batch-size 16 --max-length 512 --name defaults-16x512
bench --batch-size 16 --max-length 512 $LONG --name long-rows-16x512
bench --batch-size 16 --max-length 512 $LONG --split-layers on --breakdown --name long-rows-split-16x512
bench --batch-size 16 --max-length 64 --name defaults-16x64
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench --batch-size 16 --max-length 64 $LONG --loss-chunk 256 \
  --name small-card-expandable-16x64
timeout 120 python benchmarks/bench_loop.py $B --batch-size 16 --max-length 512 --warmup 1 --steps 1 $LONG --split-layers on \
  --snapshot $R/s.pickle --snapshot-steps 2-2 --snapshot-entries 400000 --checkpoint-early-stop off \
  --json $R/loop.jsonl --name snapshot-split-16x512 >> "$R/loop.log" 2>&1
python benchmarks/lab/peak_tensors.py $R/s.pickle --blocks 40 --top 30 > "$R/peak_split.txt" 2>&1
rm -f $R/*.pickle
python - "$R/loop.jsonl" > "$R/summary.txt" <<'PY'
import json, sys
print(f"{'name':28} {'tok/s':>8} {'alloc':>6} {'resv':>6} {'nvml':>6} {'proc':>6}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['name']:28} {r['tokens_per_s']:8.0f} {r['peak_allocated_gib']:6.3f} {r['peak_reserved_gib']:6.3f} "
          f"{r.get('device_used_gib') or 0:6.2f} {r.get('process_used_gib') or 0:6.2f}")
PY
cat "$R/summary.txt" "$R/peak_split.txt"
tar -C /tmp -czf "$OUT/call9.tar.gz" call9
BUDGET=$((575 - SECONDS)) ONLY="unsloth:512 unsloth:64 sft:512 sft:64" bash .peers/run.sh
echo "done at ${SECONDS} s"
