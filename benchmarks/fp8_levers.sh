#!/usr/bin/env bash
# The FP8 path's levers built after session 8's calls (benchmarks/NOTES.md next steps 1 and 2), for
# the H200 machine: `source .gpu/env.sh && bash benchmarks/fp8_levers.sh 1` (then `... 2`), each one
# device call of under 10 minutes, writing at most 6 files under $OUT (logs tarred).
#   1: the GPU suite (its new tests check both Triton kernels on the GPU), then at 16 x 512
#      bf16 against --fp8-matmuls on (the NF4-to-e4m3 kernel), and that with --seeded-dropout on.
#   2: 16 x 64 the same three ways; 16 x 512 FP8 with seeded dropout and 4 layers uncheckpointed;
#      a profile of the checkpointed 16 x 512 FP8 step with seeded dropout.
set -uo pipefail
part=${1:?give the part: 1 or 2}
T=$YODA_RAW_DATA/phi3-mini-4k-instruct
D=$YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl
python -c "from benchmarks import common; common.save_random_checkpoint('$T', '/tmp/phi3_random')" > /dev/null 2>&1
L="--warmup 1 --steps 49 --model /tmp/phi3_random --init pretrained --tokenizer $T --dataset $D"
mkdir -p "$OUT/logs"
loop() {  # NAME ROWSxTOKENS options...: one bench_loop.py run into loop.jsonl
  local name=$1 rows=${2%x*} tokens=${2#*x}
  shift 2
  timeout 100 python benchmarks/bench_loop.py --batch-size "$rows" --max-length "$tokens" --name "$name" \
    --json "$OUT/logs/loop.jsonl" $L "$@" > "$OUT/logs/loop_$name.log" 2>&1
}
if [ "$part" = 1 ]; then
  YODA_RAW_GPU_REPORT="$OUT/gpu_report.json" YODA_RAW_PHI3_CHECKPOINT=/tmp/phi3_random \
    timeout 270 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$OUT/gpu_suite.log" 2>&1
  loop bf16-512 16x512 --fp8-matmuls off
  loop fp8-512 16x512 --fp8-matmuls on
  loop fp8-seeded-512 16x512 --fp8-matmuls on --seeded-dropout on
else
  loop bf16-64 16x64 --fp8-matmuls off
  loop fp8-64 16x64 --fp8-matmuls on
  loop fp8-seeded-64 16x64 --fp8-matmuls on --seeded-dropout on
  loop fp8-seeded-uncheckpointed-4-512 16x512 --fp8-matmuls on --seeded-dropout on --uncheckpointed-layers 4
  P="--model $T --init random --tokenizer $T --dataset $D --batch-size 16 --max-length 512 --warmup 2 --steps 2"
  timeout 150 python benchmarks/profile_step.py --out "$OUT/profile" --name fp8_seeded_16x512 $P \
    --fp8-matmuls on --seeded-dropout on > "$OUT/logs/profile.log" 2>&1
  rm -f "$OUT"/profile/*_trace.json  # for size
fi
python - "$OUT/logs/loop.jsonl" > "$OUT/summary.txt" 2>&1 <<'PY'
import json, sys
from benchmarks import report
runs = [json.loads(line) for line in open(sys.argv[1])]
bf16 = {r["config"]["tokens_per_row"]: r for r in runs if r["name"].startswith("bf16")}
for r in runs:
    line = f"{r['name']}: {r['tokens_per_s']:.0f} tokens/s, {r['peak_allocated_gib']} GiB peak allocated"
    reference = bf16.get(r["config"]["tokens_per_row"])
    if reference is not None and reference is not r:
        worst = report.worst_relative_difference(r["losses"], reference["losses"])
        line += f"; losses at most {worst:.4%} from {reference['name']}'s over {len(r['losses'])} steps"
    print(line)
PY
cp "$OUT/logs/loop.jsonl" "$OUT/loop.jsonl"
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
