#!/usr/bin/env bash
# Call 12 (2026-12-07): a short call with the device time left. At 16 x 512: offloading with the
# split and chunks of 4,096 with expandable segments and without, the defaults, then Unsloth with
# the time left (median of 20 steps after 5: calls 10 and 11 gave the peers too few steps).
#   source .gpu/env.sh && CALL_LIMIT=250 bash benchmarks/results/memory/call12.sh   (carry .gpu and .peers)
# CALL_LIMIT (250): the second by which the call must be done; ours start no run after
# CALL_LIMIT - 150.
R=/tmp/call12
STOP_AT=$((${CALL_LIMIT:-250} - 150))
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
keep() { summary > /dev/null; tar -C /tmp -czf "$OUT/call12.tar.gz" call12; }  # what ran so far comes back
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S512 $L --name levers-expandable-16x512; keep
bench $S512 $L --name levers-16x512; keep
bench $S512 --name defaults-16x512; keep
cat "$R/summary.txt"
WARMUP=5 STEPS_512=20 BUDGET=$((${CALL_LIMIT:-250} - SECONDS)) ONLY="unsloth:512" bash .peers/run.sh
echo "done at ${SECONDS} s"
