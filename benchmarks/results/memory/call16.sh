#!/usr/bin/env bash
# Call 16 (2026-12-07, session 8, an H100, the tree at 5e92160; NOTES.md item 80): a short call with
# the device time left after calls 14 and 15. First the GPU test of --auto-batch-size under a 6 GiB cap with the CUDA graph and
# offloading (5e92160: out of memory inside the capture now goes up as itself, where call 15's card
# search crashed), then the search call 15 lost: rows of 4,096 on a 12 GiB card with the levers and
# expandable segments (11 rows trained there in call 15 before the crash; 7 fit 8 GiB in call 13).
#   source .gpu/env.sh && CALL_LIMIT=240 bash benchmarks/results/memory/call16.sh   (carry .gpu)
# It ran with CALL_LIMIT=240 (what the device time allowed): the test passed, its process outlived
# the 120 s timeout on the way out (exit 124), and no time was left for the card search.
R=/tmp/call16
LIMIT=${CALL_LIMIT:-330}
STOP_AT=$LIMIT
source benchmarks/results/memory/common.sh
YODA_RAW_PHI3_CHECKPOINT=$CK YODA_RAW_GPU_REPORT=$R/gpu_report.json timeout 120 python -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_gpu.py -k "auto_batch_size and on-on" > "$R/gpu_test.log" 2>&1
echo "GPU test exit $?"; tail -n 3 "$R/gpu_test.log"
tar -C /tmp -czf "$OUT/call16.tar.gz" call16
LEFT=$((LIMIT - SECONDS - 10))
if ((LEFT > 90)); then
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout $LEFT python benchmarks/bench_loop.py \
    --model $CK --init pretrained --tokenizer $TOK --offload-activations on --split-layers on --mlp-chunk 4096 \
    --warmup 2 --steps 3 --json "$R/cards.jsonl" --cards 12 --card-tokens 4096 --known-fit 4096:7 --max-probes 2 \
    --max-rows 256 --time-budget-s $((LEFT - 40)) >> "$R/cards.log" 2>&1
  echo "card search exit $?"
fi
grep -oE 'card [0-9.]+ GiB x [0-9]+.*$' "$R/cards.log" | tee "$R/cards.txt"
tar -C /tmp -czf "$OUT/call16.tar.gz" call16
echo "done at ${SECONDS} s"
