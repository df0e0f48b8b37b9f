#!/usr/bin/env bash
# Call 10 (2026-12-07): the split as it was meant to run (5b380bc: the layer's own checkpoint no
# longer wraps the halves), and the README's table with the peers in the same call.
# At 16 x 512: the defaults; offloading with the split and chunks of 4,096; with the split alone;
# offloading alone. At 16 x 64: the defaults and the small-card levers with expandable segments.
# Then, with the time left, chunks of 2,048 and call 8's levers. Then the peers (.peers/run.sh):
# Unsloth and TRL's SFTTrainer with the tutorial's config, at both shapes.
#   source .gpu/env.sh && bash benchmarks/results/memory/call10.sh      (carry .gpu and .peers)
# CALL_LIMIT (575): the second by which the peers must be done; ours start no run after
# CALL_LIMIT - 190.
R=/tmp/call10
STOP_AT=$((${CALL_LIMIT:-575} - 190))
source benchmarks/results/memory/common.sh
O="--offload-activations on"
bench $S512 --name defaults-16x512
bench $S512 $O --split-layers on --mlp-chunk 4096 --name offload-split-chunk4096-16x512
bench $S512 $O --split-layers on --name offload-split-16x512
bench $S512 $O --name offload-16x512
bench $S64 --name defaults-16x64
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S64 $O --compile-memory-budget 0.5 --loss-chunk 256 \
  --name small-card-expandable-16x64
bench $S512 $O --split-layers on --mlp-chunk 2048 --name offload-split-chunk2048-16x512
bench $S512 $O --compile-memory-budget 0.5 --name offload-budget05-16x512
summary
tar -C /tmp -czf "$OUT/call10.tar.gz" call10
WARMUP=3 STEPS_64=8 STEPS_512=6 BUDGET=$((${CALL_LIMIT:-575} - SECONDS)) ONLY="unsloth:512 sft:512 unsloth:64 sft:64" \
  bash .peers/run.sh
echo "done at ${SECONDS} s"
