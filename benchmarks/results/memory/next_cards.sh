#!/usr/bin/env bash
# A device call after next_call.sh (written 2026-12-07, not yet run): profiles of the levers' step
# beside the split alone (NOTES.md next step 31), then the card search with the long-row levers
# (next step 32): for 6, 8, 12 and 24 GiB cards, the most rows of 512 and of 4,096 tokens that train
# with --offload-activations on --split-layers on --mlp-chunk 4096, by NVML read every 10 ms (a
# card's size less 0.3 GiB). 16 rows of 512 are known to fit 6 GiB (call 10: 5.36 GiB), and with
# offloading alone 1, 3, 7 and 16 rows of 4,096 fit 6 to 24 GiB (calls 2, 4): the search starts
# above those.
#   source .gpu/env.sh && bash benchmarks/results/memory/next_cards.sh   (carry .gpu)
# CALL_LIMIT (575): the second by which the call must be done. Rename to callN.sh once it has run.
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
timeout $((STOP_AT - SECONDS)) python benchmarks/bench_loop.py --model $CK --init pretrained --tokenizer $TOK $L \
  --warmup 2 --steps 3 --json "$R/cards.jsonl" --cards 6,8,12,24 --card-tokens 512,4096 --known-fit 512:16,4096:1 \
  --max-probes 3 --time-budget-s $((STOP_AT - SECONDS - 100)) >> "$R/cards.log" 2>&1
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
