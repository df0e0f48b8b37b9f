#!/usr/bin/env bash
# Call 9 (2026-12-07): a short call with the device time left after fifteen failed starts. At
# 16 x 512: the defaults, then offloading with --split-layers on --mlp-chunk 4096, then chunks of
# 2,048 while time is left. Each step's peaks and the process's own NVML share. The rest of the plan
# is next_call.sh.
#   source .gpu/env.sh && bash benchmarks/results/memory/call9.sh      (carry .gpu)
set -u
R=/tmp/call9; mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader > "$R/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$R/env.txt"
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$R/loop.log" 2>&1
B="--model $CK --init pretrained --tokenizer $TOK --peaks-by-step --batch-size 16 --max-length 512 --warmup 3 --steps 6"
bench() { ((SECONDS < ${CALL_LIMIT:-200} - 60)) || { echo "skipped for time: $*" | tee -a "$R/loop.log"; return; }; timeout 90 python benchmarks/bench_loop.py $B --json $R/loop.jsonl "$@" >> "$R/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$R/loop.log"; tar -C /tmp -czf "$OUT/call9.tar.gz" call9; }
bench --name defaults-16x512
bench --offload-activations on --split-layers on --mlp-chunk 4096 --name offload-split-chunk4096-16x512
bench --offload-activations on --split-layers on --mlp-chunk 2048 --name offload-split-chunk2048-16x512
python - "$R/loop.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['name']:36} {r['tokens_per_s']:8.0f} tok/s  alloc {r['peak_allocated_gib']:.3f}  resv {r['peak_reserved_gib']:.3f}  "
          f"nvml {r.get('device_used_gib')}  proc {r.get('process_used_gib')}")
PY
echo "done at ${SECONDS} s"
