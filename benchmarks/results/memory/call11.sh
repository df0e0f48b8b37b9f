#!/usr/bin/env bash
# Call 11 (2026-12-07): call 10's second half. At 16 x 64, our defaults and the small-card levers
# beside Unsloth and SFTTrainer (the README's table: call 10's peers ran out of time at 64). 50
# steps of losses at 16 x 512, the defaults against offloading with the split and chunks of 4,096;
# the split's GPU test; with the time left, a profile of the levers' step.
#   source .gpu/env.sh && bash benchmarks/results/memory/call11.sh      (carry .gpu and .peers)
# CALL_LIMIT (575): the second by which the peers must be done; ours start no run after
# CALL_LIMIT - 200.
R=/tmp/call11
STOP_AT=$((${CALL_LIMIT:-575} - 200))
source benchmarks/results/memory/common.sh
O="--offload-activations on"
L="$O --split-layers on --mlp-chunk 4096"
bench $S64 --name defaults-16x64
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S64 $O --compile-memory-budget 0.5 --loss-chunk 256 \
  --name small-card-expandable-16x64
bench --batch-size 16 --max-length 512 --warmup 5 --steps 45 --name losses-defaults-16x512
bench --batch-size 16 --max-length 512 --warmup 5 --steps 45 $L --name losses-offload-split-chunk4096-16x512
python - "$R/loop.jsonl" > "$R/losses.txt" <<'PY'
import json, sys
by = {r["name"]: r["losses"] for r in map(json.loads, open(sys.argv[1]))}
a, b = by.get("losses-defaults-16x512"), by.get("losses-offload-split-chunk4096-16x512")
if a and b:
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    print(f"{len(rel)} steps: worst relative loss difference {rel[worst]:.5f} at step {worst + 1}; "
          f"last {a[-1]:.4f} (defaults) vs {b[-1]:.4f}")
PY
cat "$R/losses.txt"
if ((SECONDS < STOP_AT)); then
  YODA_RAW_PHI3_CHECKPOINT=$CK YODA_RAW_GPU_REPORT=$R/gpu_report.json timeout 150 python -m pytest -m gpu -q \
    -p no:cacheprovider tests/test_gpu.py -k split_layers > "$R/gpu_test.log" 2>&1
  echo "GPU test exit $?"; tail -n 2 "$R/gpu_test.log"
fi
if ((SECONDS < STOP_AT)); then
  timeout 100 python benchmarks/profile_step.py --out "$R" --name profile-levers-16x512 --warmup 3 --steps 3 \
    --model $CK --init pretrained --tokenizer $TOK --dataset "$YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl" \
    --batch-size 16 --max-length 512 --no-auto-batch-size $L > "$R/profile.log" 2>&1
  rm -f "$R"/*_trace.json
  head -n 20 "$R/profile-levers-16x512.md"
fi
summary
tar -C /tmp -czf "$OUT/call11.tar.gz" call11
WARMUP=3 STEPS_64=8 BUDGET=$((${CALL_LIMIT:-575} - SECONDS)) ONLY="unsloth:64 sft:64" bash .peers/run.sh
echo "done at ${SECONDS} s"
