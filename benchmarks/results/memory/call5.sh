#!/usr/bin/env bash
# The next device call (written 2026-12-07, not yet run): offloading's GPU test, then NOTES next
# steps 15, 17, 18 and 19, and the start-up's imports.
# What is alive at 16 x 512's peak with offloading (a memory snapshot of the eager step and the
# capture, read by lab/peak_tensors.py on the device: the pickle stays in /tmp); where offloading's
# 2.3% goes (profile_step.py with it on and off); the breakdown's 0.129 GiB with a 4 MiB cuBLAS
# workspace; then the card search for rows of 64, 512 and 2,048 tokens with the time left.
#   source .gpu/env.sh && bash benchmarks/results/memory/next_call.sh      (carry .gpu)
set -u
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$OUT/env.txt"
git log -1 --format='commit %H' >> "$OUT/env.txt" 2>/dev/null
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$OUT/loop.log" 2>&1
B="--model $CK --init pretrained --tokenizer $TOK"
M="$B --warmup 4 --steps 12 --json $OUT/loop.jsonl"
bench() { timeout 150 python benchmarks/bench_loop.py $M "$@" >> "$OUT/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$OUT/loop.log"; }
# offload.py changed after calls 2-4 (no fetching ahead what the backward had; in-flight copies derived):
# its GPU test first
YODA_RAW_PHI3_CHECKPOINT=$CK timeout 200 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py \
  -k offloaded > "$OUT/gpu_test.log" 2>&1
echo "GPU test exit $?"; tail -n 2 "$OUT/gpu_test.log"
# 15: the peak's contents, with offloading and without
for V in on off; do
  timeout 150 python benchmarks/bench_loop.py $B --batch-size 16 --max-length 512 --offload-activations $V --warmup 1 \
    --steps 1 --snapshot /tmp/snap-$V.pickle --snapshot-entries 400000 --name snapshot-$V >> "$OUT/loop.log" 2>&1
  python benchmarks/lab/peak_tensors.py /tmp/snap-$V.pickle --top 30 > "$OUT/peak_offload_$V.txt" 2>&1
  head -n 12 "$OUT/peak_offload_$V.txt"
done
# 17: where offloading's time goes
for V in on off; do
  timeout 150 python benchmarks/profile_step.py --out "$OUT" --name profile-offload-$V $B --batch-size 16 \
    --max-length 512 --offload-activations $V >> "$OUT/profile.log" 2>&1
  head -n 20 "$OUT/profile-offload-$V.md"
done
rm -f "$OUT"/*_trace.json  # large; the tables stay
# 18: the breakdown's gap, with cuBLAS's workspace at 4 MiB and as it is
bench --batch-size 16 --max-length 64 --breakdown --name defaults-64
CUBLAS_WORKSPACE_CONFIG=:4096:1 bench --batch-size 16 --max-length 64 --breakdown --name cublas-4mib-64
python -c "
import json
for line in open('$OUT/loop.jsonl'):
    r = json.loads(line); b = r.get('memory_breakdown', {})
    print(r['name'], r['tokens_per_s'], 'mismatch after loop', b.get('mismatch_after_loop_gib'), 'reserved', r['peak_reserved_gib'])
"
# The start-up: where the imports' seconds go now, and one whole run as the README gives it
python -X importtime -c "import yoda_raw.train" 2> "$OUT/importtime.txt"
sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -n 25
timeout 150 python benchmarks/lab/whole_run_split.py --out "$OUT/whole_run" --runs launched --init pretrained --model $CK \
  --tokenizer $TOK --dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl --eval-fraction 0 >> "$OUT/whole_run.log" 2>&1
cat "$OUT/whole_run/split.md" 2>/dev/null | tail -n 3
# 19: the card table for shorter rows, with offloading, with the time left
LEFT=$((585 - SECONDS))
if ((LEFT > 120)); then
  timeout $LEFT python benchmarks/bench_loop.py $B --offload-activations on --warmup 2 --steps 3 --json "$OUT/cards.jsonl" \
    --cards 6,8,12,24 --card-tokens 64,512,2048 --max-probes 3 --time-budget-s $((LEFT - 90)) >> "$OUT/cards.log" 2>&1
fi
echo "done at ${SECONDS} s"
