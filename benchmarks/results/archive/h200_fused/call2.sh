# Device call 2 of session 8 (run as: source .gpu/env.sh && bash benchmarks/results/h200_fused/call2.sh).
# --fp8-matmuls on as it now is (X and G one scale a token, W's scale from its block scales) at 16 x 512
# against bf16 and the tensor-wise form it replaced, then the GPU suite. Writes 5 files under $OUT.
T=$YODA_RAW_DATA/phi3-mini-4k-instruct
D=$YODA_RAW_DATA/yoda_sentences/yoda_sentences.jsonl
python -c "from benchmarks import common; common.save_random_checkpoint('$T', '/tmp/phi3_random')" > /dev/null 2>&1
L="--warmup 1 --steps 49 --model /tmp/phi3_random --init pretrained --tokenizer $T --dataset $D"
mkdir -p "$OUT/fp8"
timeout 240 python benchmarks/probe_fp8.py --loop --variants bf16,fp8,fp8-tensorwise \
  --out "$OUT/fp8" --batch-size 16 --max-length 512 $L > "$OUT/probe_fp8_loop.txt" 2>&1
cp "$OUT/fp8/loop.jsonl" "$OUT/loop.jsonl"
YODA_RAW_GPU_REPORT="$OUT/gpu_report.json" YODA_RAW_PHI3_CHECKPOINT=/tmp/phi3_random \
  timeout 270 python -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider > "$OUT/gpu_suite.log" 2>&1
tar czf "$OUT/logs.tgz" -C "$OUT" fp8 && rm -rf "$OUT/fp8"
