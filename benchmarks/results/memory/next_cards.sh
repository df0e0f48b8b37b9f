#!/usr/bin/env bash
# The device call after next_call.sh (written 2026-12-08 in session 10, not yet run; NOTES.md next
# step 43): the cards left, with the levers (now with addmm and the recompile cap raised) and
# expandable segments: rows of 512 on 8, 12 and 24 GiB, then rows of 4,096 on 24 GiB with the time
# left (a probe of 40 rows of 4,096 takes over a minute).
#   source .gpu/env.sh && bash benchmarks/results/memory/next_cards.sh   (carry .gpu)
# CALL_LIMIT (575): the second by which the call must be done. Rename to callN.sh once it has run.
R=/tmp/next_cards
LIMIT=${CALL_LIMIT:-575}
STOP_AT=$LIMIT
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
keep() { tar -C /tmp -czf "$OUT/next_cards.tar.gz" next_cards; }  # what ran so far comes back
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
