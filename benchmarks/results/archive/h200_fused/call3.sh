# Device call 3 of session 8 (run as: source .gpu/env.sh && bash benchmarks/results/h200_fused/call3.sh).
# --fp8-matmuls on at 16 x 64 against bf16; at 16 x 512 with 4, 8 and all 32 layers left out of
# checkpointing (FP8 now runs in those layers too); where the FP8 step's time goes now. <= 6 files under $OUT.
T=$YODA_RAW_DATA/phi3-mini-4k-instruct
D=$YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl
python -c "from benchmarks import common; common.save_random_checkpoint('$T', '/tmp/phi3_random')" > /dev/null 2>&1
L="--warmup 1 --steps 49 --model /tmp/phi3_random --init pretrained --tokenizer $T --dataset $D"
mkdir -p "$OUT/logs"
timeout 150 python benchmarks/probe_fp8.py --loop --variants bf16,fp8 \
  --out "$OUT/logs" --batch-size 16 --max-length 64 $L > "$OUT/probe_fp8_loop_16x64.txt" 2>&1
for n in 4 8 32; do
  timeout 90 python benchmarks/bench_loop.py --batch-size 16 --max-length 512 --fp8-matmuls on \
    --uncheckpointed-layers $n --name fp8-uncheckpointed-$n --json "$OUT/logs/loop.jsonl" $L \
    > "$OUT/logs/loop_fp8-uncheckpointed-$n.log" 2>&1
done
cp "$OUT/logs/loop.jsonl" "$OUT/loop.jsonl"
P="--model $T --init random --tokenizer $T --dataset $D --batch-size 16 --max-length 512 --warmup 2 --steps 2"
timeout 150 python benchmarks/profile_step.py --out "$OUT/profile" --name fp8_16x512 $P --fp8-matmuls on \
  > "$OUT/logs/profile.log" 2>&1
rm -f "$OUT"/profile/*_trace.json  # for size
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
ls -R "$OUT"
