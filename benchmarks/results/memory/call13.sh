#!/usr/bin/env bash
# Call 13 (2026-12-07, an H100, the tree at 67cb931 with this script as next_cards.sh): profiles of
# the levers' step beside the split alone (NOTES.md next step 31), then the card search with the
# long-row levers (next step 32): for 6, 8, 12 and 24 GiB cards, the most rows of 4,096 tokens,
# then of 512, that train with --offload-activations on --split-layers on --mlp-chunk 4096, by NVML
# read every 10 ms (a card's size less 0.3 GiB). 16 rows of 512 are known to fit 6 GiB (call 10: 5.36 GiB), and
# with offloading alone 1, 3, 7 and 16 rows of 4,096 fit 6 to 24 GiB (calls 2, 4): each search
# starts above what a smaller card fitted.
#   source .gpu/env.sh && CALL_LIMIT=440 CARD_ALLOC=expandable_segments:True \
#     bash benchmarks/results/memory/call13.sh   (carry .gpu)
# CALL_LIMIT (575): the second by which the call must be done. CARD_ALLOC: PYTORCH_CUDA_ALLOC_CONF
# for the card searches (empty: the allocator's defaults). It ran as next_cards.sh: its files name
# that folder.
R=/tmp/next_cards
STOP_AT=$((${CALL_LIMIT:-575} - 30))
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
D="--dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl --no-auto-batch-size"
for V in "$L" "--offload-activations on --split-layers on"; do
  N=$(echo "$V" | tr -d ' -' | cut -c1-40)
  timeout 80 python benchmarks/profile_step.py --out "$R" --name "profile-$N" --warmup 3 --steps 3 --model $CK \
    --init pretrained --tokenizer $TOK $D --batch-size 16 --max-length 512 $V >> "$R/profile.log" 2>&1
  rm -f "$R"/*_trace.json
  head -n 20 "$R/profile-$N.md"
done
tar -C /tmp -czf "$OUT/next_cards.tar.gz" next_cards
cards() {  # card-tokens, known-fit: one search of every card, its results appended to cards.jsonl
  ((SECONDS < STOP_AT - 60)) || { echo "skipped for time: cards $1" | tee -a "$R/cards.log"; return; }
  ${CARD_ALLOC:+env PYTORCH_CUDA_ALLOC_CONF=$CARD_ALLOC} timeout $((STOP_AT - SECONDS)) python benchmarks/bench_loop.py \
    --model $CK --init pretrained --tokenizer $TOK $L --warmup 2 --steps 3 --json "$R/cards.jsonl" \
    --cards 6,8,12,24 --card-tokens "$1" --known-fit "$2" --max-probes 3 \
    --time-budget-s $((STOP_AT - SECONDS - 60)) >> "$R/cards.log" 2>&1
}
cards 4096 4096:1
cards 512 512:16
python - "$R/cards.jsonl" > "$R/cards.txt" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    c = json.loads(line)["card"]
    probes = [(p["rows"], p["fits"], p["device_used_peak_gib"]) for p in c["probes"]]
    print(f"card {c['card_gib']:g} GiB x {c['tokens_per_row']}: fit {c['rows_fit']}, not {c['rows_not_fit']}, {probes}")
PY
cat "$R/cards.txt"
tar -C /tmp -czf "$OUT/next_cards.tar.gz" next_cards
echo "done at ${SECONDS} s"
