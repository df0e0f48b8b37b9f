#!/usr/bin/env bash
# The next device call (written 2026-12-07, when fifteen tries at it got no machine): the long-row
# levers of halves.py against the defaults and the levers of call 8, and the README's table with
# the peers in the same call (NOTES.md next steps 23, 26 and 27).
# At 16 x 512: the defaults; offloading with a budget of 0.5 (call 8's levers); offloading with
# --split-layers on, alone and with --mlp-chunk 4096 and 2048, and 2048 with the budget. At 16 x 64:
# the defaults and the small-card levers with expandable segments. Each step's peaks and the
# process's own NVML share. Then the peers (.peers/run.sh): Unsloth, and TRL's SFTTrainer with the
# tutorial's config, with the time left.
#   source .gpu/env.sh && bash benchmarks/results/memory/next_call.sh      (carry .gpu and .peers)
# CALL_LIMIT (575): the second of the call by which the peers must be done; ours start no run after
# CALL_LIMIT - 175, most telling first.
set -u
R=/tmp/next_call; mkdir -p "$R" "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader > "$R/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$R/env.txt"
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$R/loop.log" 2>&1
B="--model $CK --init pretrained --tokenizer $TOK --peaks-by-step"
bench() { ((SECONDS < ${CALL_LIMIT:-575} - 175)) || { echo "skipped for time: $*" | tee -a "$R/loop.log"; return; }; timeout 120 python benchmarks/bench_loop.py $B --json $R/loop.jsonl "$@" >> "$R/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$R/loop.log"; }
S512="--batch-size 16 --max-length 512 --warmup 3 --steps 6"
S64="--batch-size 16 --max-length 64 --warmup 3 --steps 8"
O="--offload-activations on"
bench $S512 --name defaults-16x512
bench $S512 $O --split-layers on --mlp-chunk 2048 --name offload-split-chunk2048-16x512
bench $S512 $O --split-layers on --mlp-chunk 4096 --name offload-split-chunk4096-16x512
bench $S512 $O --compile-memory-budget 0.5 --name offload-budget05-16x512
bench $S512 $O --split-layers on --name offload-split-16x512
bench $S512 $O --split-layers on --mlp-chunk 2048 --compile-memory-budget 0.5 --name offload-split-chunk2048-budget05-16x512
bench $S64 --name defaults-16x64
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S64 $O --compile-memory-budget 0.5 --loss-chunk 256 \
  --name small-card-expandable-16x64
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
tar -C /tmp -czf "$OUT/next_call.tar.gz" next_call
WARMUP=3 STEPS_64=8 STEPS_512=6 BUDGET=$((${CALL_LIMIT:-575} - SECONDS)) ONLY="unsloth:512 unsloth:64 sft:512 sft:64" bash .peers/run.sh
echo "done at ${SECONDS} s"
