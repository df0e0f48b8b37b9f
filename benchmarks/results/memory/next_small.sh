#!/usr/bin/env bash
# A device call after next_call.sh and next_cards.sh (written 2026-12-08 in session 10, not yet run;
# NOTES.md next step 48): the tutorial's 16 x 64 table in one call, ours and the peers. Ours: the
# defaults, the small-card levers with expandable segments, and the same with the split layers
# (where --lora-addmm now comes on). Then TRL's SFTTrainer with the tutorial's config and Unsloth,
# median of 20 steps after 5.
#   source .gpu/env.sh && bash benchmarks/results/memory/next_small.sh   (carry .gpu and .peers)
# CALL_LIMIT (575): the second by which the call must be done. Rename to callN.sh once it has run.
R=/tmp/next_small
LIMIT=${CALL_LIMIT:-575}
STOP_AT=$((LIMIT - 260))  # ours first, leaving the peers their time
source benchmarks/results/memory/common.sh
SMALL="--offload-activations on --compile-memory-budget 0.5 --loss-chunk 256"
keep() { summary > /dev/null; tar -C /tmp -czf "$OUT/next_small.tar.gz" next_small; }  # what ran so far comes back
bench $S64 --name defaults-16x64; keep
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S64 $SMALL --name small-card-expandable-16x64; keep
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True bench $S64 $SMALL --split-layers on --name small-card-split-expandable-16x64; keep
cat "$R/summary.txt"
WARMUP=5 STEPS_64=20 BUDGET=$((LIMIT - SECONDS)) ONLY="sft:64 unsloth:64" bash .peers/run.sh
echo "done at ${SECONDS} s"
