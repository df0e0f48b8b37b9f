#!/usr/bin/env bash
# Call 17 (2026-12-08, session 9, an H100, run as next_call.sh on the tree at 805a7df; NOTES.md
# next steps 42 and 39, item 81).
# At 16 x 512: the defaults and the levers with expandable segments, each with --lora-addmm off and
# on (step 42: LoRA's add inside its matmul, predicted to pay in the split's halves only); profiles
# of the levers with it on, of the defaults and of offloading alone (step 39: profile_step.py now
# lists the kernels the GPU waited longest to start; the first profile's whole trace comes back
# too); then Unsloth with the time left, median of 20 steps after 5, for the README's table.
#   source .gpu/env.sh && CALL_LIMIT=575 bash benchmarks/results/memory/call17.sh   (carry .gpu and .peers)
# CALL_LIMIT (575): the second by which the call must be done.
R=/tmp/next_call
LIMIT=${CALL_LIMIT:-575}
STOP_AT=$((LIMIT - 300))  # ours first, leaving the profiles their time
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
D="--dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl --no-auto-batch-size"
keep() { summary > /dev/null; tar -C /tmp -czf "$OUT/next_call.tar.gz" next_call; }  # what ran so far comes back
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # the levers' setting; the defaults' memory barely moves with it (NOTES item 42)
for A in off on; do
  bench $S512 --lora-addmm $A --name defaults-addmm$A-16x512; keep
  bench $S512 $L --lora-addmm $A --name levers-expandable-addmm$A-16x512; keep
done
unset PYTORCH_CUDA_ALLOC_CONF
for V in "$L --lora-addmm on" "" "--offload-activations on"; do
  ((SECONDS < LIMIT - 120)) || { echo "skipped for time: profile of ${V:-the defaults}"; break; }
  N=profile-$(echo "${V:-defaults}" | tr -d ' -' | cut -c1-40)
  timeout 80 python benchmarks/profile_step.py --out "$R" --name "$N" --warmup 3 --steps 3 --model $CK \
    --init pretrained --tokenizer $TOK $D --batch-size 16 --max-length 512 $V >> "$R/profile.log" 2>&1
  # The first profile's trace comes back (compressed; a file over 16 MiB would not).
  [[ "$V" == "$L --lora-addmm on" ]] && gzip -c "$R/${N}_trace.json" > "$OUT/trace-levers-addmm.json.gz"
  rm -f "$R"/*_trace.json
  sed -n '/GPU idle/p;/idle before/,/^$/p' "$R/$N.md"
done
keep
((LIMIT - SECONDS > 100)) && WARMUP=5 STEPS_512=20 BUDGET=$((LIMIT - SECONDS)) ONLY="unsloth:512" bash .peers/run.sh
cat "$R/summary.txt"
echo "done at ${SECONDS} s"
