#!/usr/bin/env bash
# The next device call (written 2026-12-07 in session 8, not yet run; NOTES.md next step 39): where
# the levers' last 6% goes, and the README's 16 x 512 table again with the chunks' shared FP8 cast,
# the peers beside. At 16 x 512: the defaults and the levers with expandable segments; profiles of
# the defaults, of offloading alone and of the levers (profile_step.py now lists the kernels the
# GPU waited longest to start; the levers' whole trace comes back too); then Unsloth and
# SFTTrainer, median of 20 steps after 5.
#   source .gpu/env.sh && bash benchmarks/results/memory/next_call.sh   (carry .gpu and .peers)
# CALL_LIMIT (575): the second by which the call must be done. Rename to callN.sh once it has run.
R=/tmp/next_call
LIMIT=${CALL_LIMIT:-575}
STOP_AT=$((LIMIT - 420))  # ours first, leaving the profiles and the peers their time
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
D="--dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl --no-auto-batch-size"
keep() { summary > /dev/null; tar -C /tmp -czf "$OUT/next_call.tar.gz" next_call; }  # what ran so far comes back
bench $S512 --name defaults-16x512; keep
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S512 $L --name levers-expandable-16x512; keep
for V in "" "--offload-activations on" "$L"; do
  ((SECONDS < LIMIT - 240)) || { echo "skipped for time: profile of ${V:-the defaults}"; break; }
  N=profile-$(echo "${V:-defaults}" | tr -d ' -' | cut -c1-40)
  timeout 80 python benchmarks/profile_step.py --out "$R" --name "$N" --warmup 3 --steps 3 --model $CK \
    --init pretrained --tokenizer $TOK $D --batch-size 16 --max-length 512 $V >> "$R/profile.log" 2>&1
  # The levers' trace comes back (compressed; a file over 16 MiB would not): which pass each of the
  # costliest element-wise kernels runs in, forward, recompute or backward, is in its timeline.
  [[ "$V" == "$L" ]] && gzip -c "$R/${N}_trace.json" > "$OUT/trace-levers.json.gz"
  rm -f "$R"/*_trace.json
  sed -n '/GPU idle/p;/idle before/,/^$/p' "$R/$N.md"
done
keep
WARMUP=5 STEPS_512=20 BUDGET=$((LIMIT - SECONDS)) ONLY="unsloth:512 sft:512" bash .peers/run.sh
cat "$R/summary.txt"
echo "done at ${SECONDS} s"
