#!/usr/bin/env bash
# Call 9 (2026-12-07): the README's table in one call. Ours at 16 x 64 and 16 x 512 with the
# defaults, 16 x 512 with the long-row levers (--offload-activations on --compile-memory-budget 0.5),
# 16 x 64 with the small-card levers (the same and --loss-chunk 256); each step's peaks and the
# process's own NVML share. Then Unsloth (.peers/run.sh) at 16 x 512, and at 16 x 64 if the device
# time left allows (SFTTrainer does not fit it: call 3 has it).
#   source .gpu/env.sh && bash benchmarks/results/memory/call9.sh      (carry .gpu and .peers)
set -u
R=/tmp/call9; mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$R/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$R/env.txt"
nvidia-smi --query-gpu=memory.used --format=csv,noheader >> "$R/env.txt"  # the idle card's own use
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$R/loop.log" 2>&1
B="--model $CK --init pretrained --tokenizer $TOK --warmup 4 --steps 6 --peaks-by-step"
bench() { timeout 120 python benchmarks/bench_loop.py $B --json $R/loop.jsonl "$@" >> "$R/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$R/loop.log"; }
LONG="--offload-activations on --compile-memory-budget 0.5"
bench --batch-size 16 --max-length 64 --name defaults-16x64
bench --batch-size 16 --max-length 64 $LONG --loss-chunk 256 --name small-card-16x64
bench --batch-size 16 --max-length 512 --name defaults-16x512
bench --batch-size 16 --max-length 512 $LONG --name long-rows-16x512
python - "$R/loop.jsonl" > "$R/summary.txt" <<'PY'
import json, sys
print(f"{'name':20} {'tok/s':>8} {'alloc':>6} {'resv':>6} {'nvml':>6} {'proc':>6}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['name']:20} {r['tokens_per_s']:8.0f} {r['peak_allocated_gib']:6.3f} {r['peak_reserved_gib']:6.3f} "
          f"{r.get('device_used_gib') or 0:6.2f} {r.get('process_used_gib') or 0:6.2f}")
PY
cat "$R/summary.txt"
tar -C /tmp -czf "$OUT/call9.tar.gz" call9
BUDGET=$((265 - SECONDS)) ONLY="unsloth:512 unsloth:64" bash .peers/run.sh
echo "done at ${SECONDS} s"
