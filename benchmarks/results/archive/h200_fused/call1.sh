# Device call 1 of 2026-11-29, session 8 (run as: source .gpu/env.sh && bash benchmarks/results/h200_fused/call1.sh).
# The FP8 casts' levers at 16 x 512, each variant in its own process, all in one call (NOTES next step 1),
# and LoRA's dropout's cost with --fp8-matmuls on (next step 2). Writes 4 files under $OUT.
T=$YODA_RAW_DATA/phi3-mini-4k-instruct
D=$YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
python -c "from benchmarks import common; common.save_random_checkpoint('$T', '/tmp/phi3_random')"
L="--warmup 1 --steps 49 --model /tmp/phi3_random --init pretrained --tokenizer $T --dataset $D"
mkdir -p "$OUT/fp8"
timeout 400 python benchmarks/probe_fp8.py --loop --variants bf16,fp8,fp8-block-scale,fp8-fused,fp8-rowwise \
  --out "$OUT/fp8" --batch-size 16 --max-length 512 $L > "$OUT/probe_fp8_loop.txt" 2>&1
timeout 100 python benchmarks/bench_loop.py --batch-size 16 --max-length 512 --fp8-matmuls on --lora-dropout 0 \
  --name fp8-no-dropout --json "$OUT/fp8/loop.jsonl" $L > "$OUT/fp8/loop_fp8-no-dropout.log" 2>&1
cp "$OUT/fp8/loop.jsonl" "$OUT/loop.jsonl"
tar czf "$OUT/logs.tgz" -C "$OUT" fp8 && rm -rf "$OUT/fp8"
