#!/usr/bin/env bash
# Device call 1 (2026-12-07): --offload-activations against the defaults, each configuration in its
# own process: 16 x 512 and 16 x 64 (alternating), the GPU test of its losses and memory, one row
# of 4,096 tokens, and what the process holds outside torch, stage by stage.
#   source .gpu/env.sh && bash benchmarks/results/memory/call1.sh      (carry .gpu)
set -u
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$OUT/env.txt"
git log -1 --format='commit %H' >> "$OUT/env.txt" 2>/dev/null
CK=/tmp/phi3-random
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
python -c "from benchmarks.common import save_random_checkpoint as s; s('$TOK', '$CK')" > "$OUT/loop.log" 2>&1
M="--model $CK --init pretrained --tokenizer $TOK --warmup 4 --steps 12 --json $OUT/loop.jsonl"
bench() { timeout 150 python benchmarks/bench_loop.py $M "$@" >> "$OUT/loop.log" 2>&1 || echo "exit $? for $*" | tee -a "$OUT/loop.log"; }
bench --batch-size 16 --max-length 512 --breakdown --name defaults-16x512
bench --batch-size 16 --max-length 512 --breakdown --offload-activations on --name offload-16x512
YODA_RAW_PHI3_CHECKPOINT=$CK YODA_RAW_GPU_REPORT="$OUT/gpu_test.json" timeout 200 python -m pytest -m gpu -q \
  -p no:cacheprovider tests/test_gpu.py -k offloaded > "$OUT/gpu_test.log" 2>&1
echo "GPU test exit $? at ${SECONDS} s" | tee "$OUT/summary.txt"
tail -n 3 "$OUT/gpu_test.log" | tee -a "$OUT/summary.txt"
bench --batch-size 16 --max-length 64 --name defaults-16x64
bench --batch-size 16 --max-length 64 --offload-activations on --name offload-16x64
if ((SECONDS < 400)); then
  bench --batch-size 1 --max-length 4096 --warmup 3 --steps 6 --name defaults-1x4096
  bench --batch-size 1 --max-length 4096 --warmup 3 --steps 6 --offload-activations on --name offload-1x4096
fi
if ((SECONDS < 480)); then
  timeout $((585 - SECONDS)) python benchmarks/lab/outside_torch.py --model $CK --init pretrained --tokenizer $TOK \
    --batch-size 16 --max-length 512 --json "$OUT/outside.jsonl" > "$OUT/outside.log" 2>&1
  grep -E "used|CUDA_MODULE" "$OUT/outside.log" | tee -a "$OUT/summary.txt"
fi
python - "$OUT/loop.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
print(f"{'name':<18} {'tokens/s':>9} {'step ms':>8} {'peak alloc':>10} {'reserved':>9} {'NVML peak':>9} {'loss first/last':>18}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    nvml = r.get("device_used_peak_gib") or r.get("device_used_gib") or 0
    print(f"{r['name']:<18} {r['tokens_per_s']:>9,.0f} {1000 * r['step_s']:>8.1f} {r['peak_allocated_gib']:>10.3f} "
          f"{r['peak_reserved_gib']:>9.3f} {nvml:>9.3f} {r['loss_first']:>9.5f}/{r['loss_last']:.5f}")
PY
echo "done at ${SECONDS} s" | tee -a "$OUT/summary.txt"
