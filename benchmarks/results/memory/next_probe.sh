#!/usr/bin/env bash
# The next device call (written 2026-12-08 in session 12, not yet run: the device paused loans
# before it could; NOTES item 89 and next step 51). Why call 20's --auto-batch-size test under a 6
# GiB cap with the CUDA graph and offloading never settled: 9 rows of 512 after a first run in the
# same process (as the test ran after others; what that run leaves reachable on the GPU is listed),
# and in a fresh process, then 17 fresh; no retry, with the memory just before the capture and
# torch's own message if it runs out (capture_probe.py). Then the GPU test of what a finished run
# leaves allocated. About 300 s; next_cards.sh can follow on the same machine.
#   source .gpu/env.sh && bash benchmarks/results/memory/next_probe.sh   (carry .gpu)
# Rename to callN.sh once it has run.
R=/tmp/next_probe
STOP_AT=0  # no benches
source benchmarks/results/memory/common.sh
keep() { tar -C /tmp -czf "$OUT/next_probe.tar.gz" next_probe; }  # what ran so far comes back
P="--model $CK --tokenizer $TOK --dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl"
P="$P --max-steps 2 --logging-steps 1 --cuda-graph on --offload-activations on --eval-fraction 0 --no-samples"
probe() {  # name, rows, [--after-a-run]
  timeout 120 python benchmarks/results/memory/capture_probe.py $2 /tmp/probe-$1 ${3:-} $P > "$R/probe-$1.log" 2>&1
  echo "$1: exit $?" >> "$R/probe-$1.log"; grep -E "^rows|^error|exit" "$R/probe-$1.log"; keep
}
probe after-a-run-9 9 --after-a-run
probe fresh-9 9
probe fresh-17 17
YODA_RAW_PHI3_CHECKPOINT=$CK YODA_RAW_GPU_REPORT=$R/gpu_report.json timeout 200 python -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_gpu.py -k "finished_run_leaves_nothing" > "$R/gpu_test.log" 2>&1
echo "GPU test exit $?"; tail -n 3 "$R/gpu_test.log"; keep
echo "done at ${SECONDS} s"
