#!/usr/bin/env bash
# Call 19 (2026-12-08, session 9, an H100 right after calls 17 and 18, run as next_startup.sh on the
# tree at 805a7df; NOTES.md next step 41, items 51, 64 and 83), on start-up: the whole run as the
# README gives it, three times on one machine, timed by lab/whole_run_split.py: a first run (the
# compile cache empty), a second (the cache and the base model's hash from the first), and the
# second without the launcher (python run.py). Then where the imports' seconds go on that machine.
# Predicted: the first about 61 s as in call 5; the second about 10 s sooner from the compile cache
# and 7 s from the hash, near 44 s; without the launcher about 4 s less again, near 40 s.
# Issue 29's 35 s is met by none of them, if so.
#   source .gpu/env.sh && bash benchmarks/results/memory/call19.sh   (carry .gpu; about 220 s)
R=/tmp/next_startup
STOP_AT=0  # no bench_loop.py runs here
source benchmarks/results/memory/common.sh
timeout 400 python benchmarks/lab/whole_run_split.py --out "$R/whole_run" --runs launched,launched-again,python \
  --init pretrained --model $CK --tokenizer $TOK --dataset $YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl \
  --eval-fraction 0 > "$R/whole_run.log" 2>&1 || echo "exit $? for whole_run_split.py"
cat "$R/whole_run/split.md"
python -X importtime -c "import yoda_raw.train" 2> "$R/importtime.txt"
sort -t'|' -k2 -n "$R/importtime.txt" | tail -n 25
tar -C /tmp -czf "$OUT/next_startup.tar.gz" next_startup
echo "done at ${SECONDS} s"
