#!/usr/bin/env bash
# Call 7 (2026-12-07), on call 6's machine, warm: the compile memory budget's 0.6 and 0.4 at 16 x 512,
# and 0.5 at 16 x 64, with offloading. What ran, as one command line, laid out here.
#   source .gpu/env.sh && bash benchmarks/results/memory/call7.sh      (carry .gpu)
R=/tmp/call7 && mkdir -p $R && CK=/tmp/phi3-random && TOK=$YODA_RAW_DATA/phi3-mini-4k-instruct
(test -d $CK || python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')") > $R/loop.log 2>&1
B="--model $CK --init pretrained --tokenizer $TOK --json $R/loop.jsonl --breakdown --warmup 4 --steps 12"
for a in "--batch-size 16 --max-length 512 --offload-activations on --compile-memory-budget 0.6 --name offload-budget0.6-16x512" \
  "--batch-size 16 --max-length 512 --offload-activations on --compile-memory-budget 0.4 --name offload-budget0.4-16x512" \
  "--batch-size 16 --max-length 64 --offload-activations on --compile-memory-budget 0.5 --name offload-budget0.5-16x64"; do
  ((SECONDS < 190)) && timeout 80 python benchmarks/bench_loop.py $B $a >> $R/loop.log 2>&1
done
python -c "
import json
for l in open('$R/loop.jsonl'):
    r=json.loads(l); b=r['memory_breakdown']; print(r['name'], round(r['tokens_per_s']), r['peak_allocated_gib'], r['peak_reserved_gib'], r['device_used_gib'], b['mismatch_after_loop_gib'])
" | tee $R/summary.txt
nvidia-smi --query-gpu=name --format=csv,noheader >> $R/summary.txt; git log -1 --format=%H >> $R/summary.txt
tar -C /tmp -czf $OUT/call7.tar.gz call7; echo done $SECONDS
