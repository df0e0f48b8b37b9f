#!/usr/bin/env bash
# Call 12 (2026-12-07, an H100, the tree at 67cb931; written in session 6 as next_call.sh, run in
# session 7): the README's tables in one call with the peers at 20 steps, and expandable segments
# with the 16 x 512 levers.
# At 16 x 512: the defaults; offloading with the split and chunks of 4,096, with expandable
# segments and without. At 16 x 64: the defaults and the small-card levers. Then Unsloth and TRL's
# SFTTrainer with the tutorial's config at both shapes, median of 20 steps after 5 (calls 10 and 11
# gave the peers 6 and 8 steps: too few for their spread).
#   source .gpu/env.sh && CALL_LIMIT=575 bash benchmarks/results/memory/call12.sh   (carry .gpu and .peers)
# CALL_LIMIT (575): the second by which the call must be done; ours start no run after
# CALL_LIMIT - 260. It ran as next_call.sh: its files name that folder.
R=/tmp/next_call
STOP_AT=$((${CALL_LIMIT:-575} - 260))
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
keep() { summary > /dev/null; tar -C /tmp -czf "$OUT/next_call.tar.gz" next_call; }  # what ran so far comes back
bench $S512 --name defaults-16x512; keep
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S512 $L --name levers-expandable-16x512; keep
bench $S512 $L --name levers-16x512; keep
bench $S64 --name defaults-16x64; keep
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S64 --offload-activations on --compile-memory-budget 0.5 \
  --loss-chunk 256 --name small-card-expandable-16x64; keep
cat "$R/summary.txt"
WARMUP=5 STEPS_64=20 STEPS_512=20 BUDGET=$((${CALL_LIMIT:-575} - SECONDS)) \
  ONLY="unsloth:512 sft:512 unsloth:64 sft:64" bash .peers/run.sh
echo "done at ${SECONDS} s"
