#!/usr/bin/env bash
# Call 14 (2026-12-07, session 8, an H100, the tree at 004a015 with this script as next_call.sh; its
# files name it so; NOTES.md next steps 33 and 37, items 77-78). At 16 x 512: the defaults, then the
# long-row levers with expandable segments with offloading's forward copies in flight
# (yoda_raw/offload.py's IN_FLIGHT) at 2 (as it is), 3 and 4 (step 37). Then the chunks' shared e4m3
# cast (893c8a3, step 33): profiles of the levers and of offloading with the split alone (call 13
# had the chunks at +13.8 ms a step; predicted +10.2), and the split's GPU test, which runs the
# shared cast in the CUDA graph with compiled halves.
#   source .gpu/env.sh && CALL_LIMIT=570 bash benchmarks/results/memory/call14.sh   (carry .gpu)
# CALL_LIMIT (575): the second by which the call must be done; no run starts after CALL_LIMIT - 150.
R=/tmp/next_call
LIMIT=${CALL_LIMIT:-575}
STOP_AT=$((LIMIT - 150))
source benchmarks/results/memory/common.sh
L="--offload-activations on --split-layers on --mlp-chunk 4096"
D="--dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl --no-auto-batch-size"
keep() { summary > /dev/null; tar -C /tmp -czf "$OUT/next_call.tar.gz" next_call; }  # what ran so far comes back

in_flight() {  # N, then bench_loop.py's options: one run with offload.IN_FLIGHT = N
  local n=$1
  shift
  ((SECONDS < STOP_AT)) || { echo "skipped for time: in flight $n" | tee -a "$R/loop.log"; return; }
  timeout 120 python - "$n" $B --json "$R/loop.jsonl" "$@" >> "$R/loop.log" 2>&1 <<'PY' ||
import runpy, sys
from yoda_raw import offload
offload.IN_FLIGHT = int(sys.argv[1])
sys.argv = ["benchmarks/bench_loop.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
PY
    echo "exit $? for in flight $n" | tee -a "$R/loop.log"
}

bench $S512 --name defaults-16x512; keep
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # the levers' runs from here on
for n in 2 3 4; do in_flight $n $S512 $L --name "levers-expandable-inflight$n-16x512"; keep; done
unset PYTORCH_CUDA_ALLOC_CONF
if ((SECONDS < LIMIT - 150)); then
  YODA_RAW_PHI3_CHECKPOINT=$CK YODA_RAW_GPU_REPORT=$R/gpu_report.json timeout 150 python -m pytest -m gpu -q \
    -p no:cacheprovider tests/test_gpu.py -k split_layers > "$R/gpu_test.log" 2>&1
  echo "GPU test exit $?"; tail -n 2 "$R/gpu_test.log"
fi
for V in "$L" "--offload-activations on --split-layers on"; do
  ((SECONDS < LIMIT - 90)) || break
  N=profile-$(echo "$V" | tr -d ' -' | cut -c1-40)
  timeout 80 python benchmarks/profile_step.py --out "$R" --name "$N" --warmup 3 --steps 3 --model $CK \
    --init pretrained --tokenizer $TOK $D --batch-size 16 --max-length 512 $V >> "$R/profile.log" 2>&1
  rm -f "$R"/*_trace.json
  head -n 20 "$R/$N.md"
done
keep
cat "$R/summary.txt"
echo "done at ${SECONDS} s"
