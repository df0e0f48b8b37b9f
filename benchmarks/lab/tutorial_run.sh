#!/usr/bin/env bash
# The whole tutorial recipe on the H200 with random Phi-3-mini weights (none exist there), the real
# Phi-3 tokenizer and the 720 yoda rows: `source .gpu/env.sh && bash benchmarks/lab/tutorial_run.sh`.
# Writes run.log, metrics.jsonl, run_config.json and env.json under $OUT.
set -euo pipefail
out=${OUT:-/tmp/tutorial_run}
mkdir -p "$out"
python - > "$out/env.json" <<'PY'
import json, datetime, torch, transformers, peft, accelerate, bitsandbytes
print(json.dumps({"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(0),
                  "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                  "accelerate": accelerate.__version__, "bitsandbytes": bitsandbytes.__version__}))
PY
data=$YODA_RAW_DATA
start=$(date +%s)
accelerate launch --num_processes 1 run.py \
  --init random --model "$data/phi3-mini-4k-instruct" --dataset "$data/yoda_sentences/yoda_sentences.jsonl" \
  --output-dir /tmp/yoda_tutorial --overwrite "$@" > "$out/run.log" 2>&1 || { tail -c 3000 "$out/run.log"; exit 1; }
tr '\r' '\n' < "$out/run.log" | grep -v "^training:\|^Loading weights\|^Writing model" | tail -n 30
echo "{\"wall_s\": $(( $(date +%s) - start ))}" > "$out/wall.json"
cp /tmp/yoda_tutorial/metrics.jsonl /tmp/yoda_tutorial/run_config.json "$out/"
