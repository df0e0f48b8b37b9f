#!/usr/bin/env bash
# Call 15 (2026-12-07, session 8, an H100, right after call 14 on the same machine and tree, with this
# script as next_cards.sh; NOTES.md next step 35, item 79): the card search call 13 had no time for.
# With --offload-activations on --split-layers on --mlp-chunk 4096 and expandable segments: rows of
# 4,096 on 12 and 24 GiB cards (7 fit 8 GiB in call 13: the search starts there), then rows of 512
# on 6, 8, 12 and 24 GiB (16 fit 6 GiB: calls 10, 12). Both searches crashed at their second probe
# (out of memory inside the CUDA graph's capture; mended in 5e92160): see the results' README.
#   source .gpu/env.sh && CALL_LIMIT=570 bash benchmarks/results/memory/call15.sh   (carry .gpu)
# CALL_LIMIT (575): the second by which the call must be done.
R=/tmp/next_cards
STOP_AT=$((${CALL_LIMIT:-575} - 30))
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
cards() {  # cards, card-tokens, known-fit: one search of each card, its results appended to cards.jsonl
  ((SECONDS < STOP_AT - 60)) || { echo "skipped for time: cards $1 x $2" | tee -a "$R/cards.log"; return; }
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout $((STOP_AT - SECONDS)) python benchmarks/bench_loop.py \
    --model $CK --init pretrained --tokenizer $TOK $L --warmup 2 --steps 3 --json "$R/cards.jsonl" \
    --cards "$1" --card-tokens "$2" --known-fit "$3" --max-probes 3 --max-rows 256 \
    --time-budget-s $((STOP_AT - SECONDS - 60)) >> "$R/cards.log" 2>&1
  tar -C /tmp -czf "$OUT/next_cards.tar.gz" next_cards
}
cards 12,24 4096 4096:7
cards 6,8,12,24 512 512:16
grep -oE 'card [0-9.]+ GiB x [0-9]+.*$' "$R/cards.log" > "$R/cards.txt"  # bench_loop.py's line a card
cat "$R/cards.txt"
tar -C /tmp -czf "$OUT/next_cards.tar.gz" next_cards
echo "done at ${SECONDS} s"
