#!/usr/bin/env bash
# The FP8 path's levers built after session 8's calls (benchmarks/NOTES.md next steps 1 and 2), for
# the H200 machine: `source .gpu/env.sh && bash benchmarks/fp8_levers.sh 1` (then `... 2`), each one
# device call of under 10 minutes, writing at most 6 files under $OUT (logs tarred).
#   1: the GPU suite (its new tests check both Triton kernels on the GPU), then at 16 x 512
#      bf16 against --fp8-matmuls on (the NF4-to-e4m3 kernel), and that with --seeded-dropout on.
#   2: 16 x 64 bf16 and FP8, each with and without seeded dropout; 16 x 512 bf16 against FP8 with
#      seeded dropout again (part 1's pair, in a second call); a profile of the checkpointed
#      16 x 512 FP8 step with seeded dropout.
# probe_fp8.py --loop runs each variant in its own process and prints tokens/s, memory and each
# variant's losses against bf16's (summary.txt).
set -uo pipefail
part=${1:?give the part: 1 or 2}
T=$YODA_RAW_DATA/phi3-mini-4k-instruct
D=$YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl
python -c "from benchmarks import common; common.save_random_checkpoint('$T', '/tmp/phi3_random')" > /dev/null 2>&1
L="--warmup 1 --steps 49 --model /tmp/phi3_random --init pretrained --tokenizer $T --dataset $D"
loop() {  # FOLDER ROWS TOKENS VARIANTS options...: each variant compared with the first
  local folder=$1 rows=$2 tokens=$3 variants=$4
  shift 4
  echo "== $folder: $rows x $tokens $*" >> "$OUT/summary.txt"
  timeout 300 python benchmarks/probe_fp8.py --loop --variants "$variants" --out "$OUT/logs/$folder" \
    --batch-size "$rows" --max-length "$tokens" $L "$@" >> "$OUT/summary.txt" 2>&1
}
mkdir -p "$OUT/logs"
if [ "$part" = 1 ]; then
  YODA_RAW_GPU_REPORT="$OUT/gpu_report.json" YODA_RAW_PHI3_CHECKPOINT=/tmp/phi3_random \
    timeout 270 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$OUT/gpu_suite.log" 2>&1
  loop 16x512 16 512 bf16,fp8,fp8-seeded
else
  loop 16x64 16 64 bf16,bf16-seeded,fp8,fp8-seeded
  loop 16x512-again 16 512 bf16,fp8-seeded
  P="--model $T --init random --tokenizer $T --dataset $D --batch-size 16 --max-length 512 --warmup 2 --steps 2"
  timeout 150 python benchmarks/profile_step.py --out "$OUT/profile" --name fp8_seeded_16x512 $P \
    --fp8-matmuls on --seeded-dropout on > "$OUT/logs/profile.log" 2>&1
  rm -f "$OUT"/profile/*_trace.json  # for size
fi
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
