#!/usr/bin/env bash
# The next device call (written 2026-12-08 in session 9, not yet run; NOTES.md next steps 44, 45, 43).
# First the GPU tests this session's changes need (--lora-addmm now on in the split's run; torch's
# recompile cap raised, under --auto-batch-size's retries with the graph and offloading). Then
# offloading's profile at 16 x 512 with its trace kept (step 45). Then the cards left with the
# levers (now with addmm) and expandable segments: rows of 512 on 8, 12 and 24 GiB, and rows of
# 4,096 on 24 GiB with the time left (step 43; a probe of 40 rows of 4,096 takes over a minute).
#   source .gpu/env.sh && bash benchmarks/results/memory/next_call.sh   (carry .gpu)
# CALL_LIMIT (575): the second by which the call must be done. Rename to callN.sh once it has run.
R=/tmp/next_call
LIMIT=${CALL_LIMIT:-575}
STOP_AT=$LIMIT
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
D="--dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl --no-auto-batch-size"
keep() { tar -C /tmp -czf "$OUT/next_call.tar.gz" next_call; }  # what ran so far comes back
YODA_RAW_PHI3_CHECKPOINT=$CK YODA_RAW_GPU_REPORT=$R/gpu_report.json timeout 240 python -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_gpu.py -k "split_layers or (auto_batch_size and on-on)" > "$R/gpu_test.log" 2>&1
echo "GPU tests exit $?"; tail -n 3 "$R/gpu_test.log"; keep
N=profile-offload
timeout 80 python benchmarks/profile_step.py --out "$R" --name $N --warmup 3 --steps 3 --model $CK \
  --init pretrained --tokenizer $TOK $D --batch-size 16 --max-length 512 --offload-activations on >> "$R/profile.log" 2>&1
gzip -c "$R/${N}_trace.json" > "$OUT/trace-offload.json.gz"; rm -f "$R"/*_trace.json
sed -n '/GPU idle/p;/idle before/,/^$/p' "$R/$N.md"; keep
cards() {  # cards, card-tokens, known-fit: one search of each card, its results appended to cards.jsonl
  ((LIMIT - SECONDS > 150)) || { echo "skipped for time: cards $1 x $2" | tee -a "$R/cards.log"; return; }
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout $((LIMIT - SECONDS - 20)) python benchmarks/bench_loop.py \
    --model $CK --init pretrained --tokenizer $TOK $L --warmup 2 --steps 3 --json "$R/cards.jsonl" \
    --cards "$1" --card-tokens "$2" --known-fit "$3" --max-probes 3 --max-rows 256 \
    --time-budget-s $((LIMIT - SECONDS - 80)) >> "$R/cards.log" 2>&1
  keep
}
cards 8,12,24 512 512:24
cards 24 4096 4096:14
grep -oE 'card [0-9.]+ GiB x [0-9]+.*$' "$R/cards.log" | tee "$R/cards.txt"
keep
echo "done at ${SECONDS} s"
