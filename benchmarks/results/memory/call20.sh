#!/usr/bin/env bash
# The next device call (written 2026-12-08 in session 10, not yet run; NOTES.md next steps 47, 45, 44,
# and item 87's check in session 11: the gap before the supervised-token count, in gaps-levers.md).
# At 16 x 512 with expandable segments: the defaults and the levers (now with addmm, and offloading
# keeping what is saved after the last layer on the GPU, 743d837), two runs each, alternated, for
# the speed goal (step 47); the levers' profile with its trace kept (step 45); then the GPU tests
# this session's and the last one's changes need (step 44): offloading's and the split's runs, and
# --auto-batch-size's retries under a cap with the graph and offloading (the raised recompile cap).
#   source .gpu/env.sh && bash benchmarks/results/memory/next_call.sh   (carry .gpu)
# CALL_LIMIT (575): the second by which the call must be done. Rename to callN.sh once it has run.
R=/tmp/next_call
LIMIT=${CALL_LIMIT:-575}
STOP_AT=$((LIMIT - 330))  # the benches first, leaving the profile and the tests their time
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
D="--dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl --no-auto-batch-size"
keep() { summary > /dev/null; tar -C /tmp -czf "$OUT/next_call.tar.gz" next_call; }  # what ran so far comes back
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
for K in 1 2; do
  bench $S512 --name defaults-16x512-$K; keep
  bench $S512 $L --name levers-16x512-$K; keep
done
unset PYTORCH_CUDA_ALLOC_CONF
N=profile-levers
timeout 80 python benchmarks/profile_step.py --out "$R" --name $N --warmup 3 --steps 3 --model $CK \
  --init pretrained --tokenizer $TOK $D --batch-size 16 --max-length 512 $L >> "$R/profile.log" 2>&1
timeout 60 python benchmarks/lab/gap_waits.py "$R/${N}_trace.json" --steps 3 > "$R/gaps-levers.md" 2>&1
gzip -c "$R/${N}_trace.json" > "$OUT/trace-levers.json.gz"; rm -f "$R"/*_trace.json
sed -n '/GPU idle/p;/idle before/,/^$/p' "$R/$N.md"; cat "$R/gaps-levers.md"; keep
YODA_RAW_PHI3_CHECKPOINT=$CK YODA_RAW_GPU_REPORT=$R/gpu_report.json timeout $((LIMIT - SECONDS - 10)) python -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_gpu.py -k "offloaded or split_layers or (auto_batch_size and on-on)" > "$R/gpu_test.log" 2>&1
echo "GPU tests exit $?"; tail -n 3 "$R/gpu_test.log"; keep
cat "$R/summary.txt"
echo "done at ${SECONDS} s"
