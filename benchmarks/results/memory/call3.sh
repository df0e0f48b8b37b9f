#!/usr/bin/env bash
# Device call 3 (2026-12-07): the README table in one call. Our defaults at 16 x 64 and 16 x 512,
# then the peers (TRL SFTTrainer with the tutorial's SFTConfig, Unsloth) at the same shapes through
# the peer runner (.peers/run.sh: its README gives versions and what each variant is).
#   source .gpu/env.sh && bash benchmarks/results/memory/call3.sh      (carry .gpu and .peers)
set -u
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$OUT/env.txt"
CK=/tmp/phi3-random
python -c "from benchmarks.common import save_random_checkpoint as s; s('$YODA_RAW_DATA/phi3-mini-4k-instruct', '$CK')" > "$OUT/loop.log" 2>&1
M="--model $CK --init pretrained --tokenizer $YODA_RAW_DATA/phi3-mini-4k-instruct --warmup 5 --steps 20 --json $OUT/loop.jsonl"
for T in 64 512; do
  timeout 120 python benchmarks/bench_loop.py $M --batch-size 16 --max-length $T --name ours-$T >> "$OUT/loop.log" 2>&1
done
timeout 120 python benchmarks/bench_loop.py $M --batch-size 16 --max-length 512 --offload-activations on \
  --name ours-offload-512 >> "$OUT/loop.log" 2>&1
python - "$OUT/loop.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['name']:<10} {r['tokens_per_s']:>9,.0f} tokens/s  peak allocated {r['peak_allocated_gib']:.3f} GiB  "
          f"reserved {r['peak_reserved_gib']:.3f}  NVML {r.get('device_used_gib')}")
PY
BUDGET=$((570 - SECONDS)) ONLY="sft:64 unsloth:64 sft:512 unsloth:512" bash .peers/run.sh
