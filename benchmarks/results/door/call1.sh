#!/usr/bin/env bash
# Device call 1 (2026-12-07): the defaults before the redesign (7930d18, unpacked into .baseline/
# with `git archive 7930d18 yoda_raw run.py benchmarks/bench_loop.py benchmarks/common.py`) and after
# it, at 16 x 64 and 16 x 512, each configuration in its own process, alternating; the chunked loss
# off at 16 x 512; the GPU suite; then, with the time left, 16 x 512 with expandable segments.
#   source .gpu/env.sh && bash benchmarks/results/door/call1.sh      (carry .gpu and .baseline)
set -u
ROOT=$PWD
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/env.txt"
python -c "import torch, transformers, peft, accelerate, bitsandbytes as b; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" >> "$OUT/env.txt"
CK=/tmp/phi3-random
python -c "from benchmarks.common import save_random_checkpoint as s; s('$YODA_RAW_DATA/phi3-mini-4k-instruct', '$CK')" > "$OUT/loop.log" 2>&1
TOK="$YODA_RAW_DATA/phi3-mini-4k-instruct"
M="--model $CK --init pretrained --tokenizer $TOK --warmup 4 --steps 12 --json $OUT/loop.jsonl"
for T in 64 512; do
  (cd .baseline && PYTHONPATH="$ROOT/.gpu/site:$ROOT/.baseline" timeout 120 python benchmarks/bench_loop.py $M \
    --batch-size 16 --max-length $T --name before-$T) >> "$OUT/loop.log" 2>&1
  timeout 120 python benchmarks/bench_loop.py $M --batch-size 16 --max-length $T --name after-$T >> "$OUT/loop.log" 2>&1
done
timeout 120 python benchmarks/bench_loop.py $M --batch-size 16 --max-length 512 --chunked-loss off \
  --name after-unchunked-512 >> "$OUT/loop.log" 2>&1
python - "$OUT/loop.jsonl" <<'PY' | tee "$OUT/summary.txt"
import json, sys
print(f"{'name':<22} {'tokens/s':>9} {'step ms':>8} {'peak alloc GiB':>14} {'reserved':>9} {'NVML peak':>9}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['name']:<22} {r['tokens_per_s']:>9,.0f} {1000 * r['step_s']:>8.1f} {r['peak_allocated_gib']:>14.3f} "
          f"{r['peak_reserved_gib']:>9.3f} {r.get('device_used_peak_gib') or r.get('device_used_gib') or 0:>9.3f}")
PY
LEFT=$((520 - SECONDS))
echo "GPU suite with ${LEFT} s left" | tee -a "$OUT/summary.txt"
timeout $LEFT python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_trace.py > "$OUT/gpu_suite.log" 2>&1
echo "GPU suite exit $?" | tee -a "$OUT/summary.txt"
tail -n 5 "$OUT/gpu_suite.log" | tee -a "$OUT/summary.txt"
LEFT=$((585 - SECONDS))
if ((LEFT > 60)); then
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout $LEFT python benchmarks/bench_loop.py $M --batch-size 16 \
    --max-length 512 --name after-expandable-512 >> "$OUT/loop.log" 2>&1
  tail -n 1 "$OUT/loop.jsonl" | python -c "import json,sys; r=json.loads(sys.stdin.read()); print(r['name'], r['tokens_per_s'], r['peak_allocated_gib'], r['peak_reserved_gib'], r.get('device_used_gib'))" | tee -a "$OUT/summary.txt"
fi
