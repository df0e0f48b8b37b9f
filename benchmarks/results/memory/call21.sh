#!/usr/bin/env bash
# Call 21 (session 12): why call 20's --auto-batch-size test under a 6 GiB cap with the CUDA graph
# and offloading never settled (NOTES item 89): runs of 9 rows of 512 in a fresh process and after
# a first run in the same process (as the test ran after others), then 17 rows, no retry, with the
# memory just before the capture and torch's own message if it runs out (capture_probe.py). Then
# the cards left (next_cards.sh's searches) with the time left.
#   source .gpu/env.sh && CALL_LIMIT=420 bash benchmarks/results/memory/call21.sh   (carry .gpu)
R=/tmp/call21
LIMIT=${CALL_LIMIT:-420}
STOP_AT=$LIMIT
source benchmarks/results/memory/common.sh
keep() { tar -C /tmp -czf "$OUT/call21.tar.gz" call21; }  # what ran so far comes back
P="--model $CK --tokenizer $TOK --dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl"
P="$P --max-steps 2 --logging-steps 1 --cuda-graph on --offload-activations on --eval-fraction 0 --no-samples"
probe() {  # name, rows, [--after-a-run]
  timeout 120 python benchmarks/results/memory/capture_probe.py $2 /tmp/probe-$1 ${3:-} $P > "$R/probe-$1.log" 2>&1
  echo "$1: exit $?" >> "$R/probe-$1.log"; grep -E "^rows|^error|exit" "$R/probe-$1.log"; keep
}
probe after-a-run-9 9 --after-a-run
probe fresh-9 9
probe fresh-17 17
L="--offload-activations on --split-layers on --mlp-chunk 4096"
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
