#!/usr/bin/env bash
# Call 12 (2026-12-07): the README's table in one call. At 16 x 512 and 16 x 64: our defaults and
# the memory levers (offloading with the split and chunks of 4,096; the small-card levers), then
# Unsloth and TRL's SFTTrainer with the tutorial's config at both shapes, median of 20 steps after 5
# (calls 10 and 11 gave the peers 6 and 8 steps: too few for Unsloth's spread).
#   source .gpu/env.sh && CALL_LIMIT=440 bash benchmarks/results/memory/call12.sh   (carry .gpu and .peers)
# CALL_LIMIT (440): the second by which the peers must be done; ours start no run after
# CALL_LIMIT - 240.
R=/tmp/call12
STOP_AT=$((${CALL_LIMIT:-440} - 240))
source benchmarks/results/memory/common.sh
O="--offload-activations on"
bench $S512 --name defaults-16x512
bench $S512 $O --split-layers on --mlp-chunk 4096 --name offload-split-chunk4096-16x512
bench $S64 --name defaults-16x64
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S64 $O --compile-memory-budget 0.5 --loss-chunk 256 \
  --name small-card-expandable-16x64
summary
tar -C /tmp -czf "$OUT/call12.tar.gz" call12
WARMUP=5 STEPS_64=20 STEPS_512=20 BUDGET=$((${CALL_LIMIT:-440} - SECONDS)) \
  ONLY="unsloth:512 sft:512 unsloth:64 sft:64" bash .peers/run.sh
echo "done at ${SECONDS} s"
