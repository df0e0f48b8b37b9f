"""Probe (issue 12, benchmarks/NOTES.md): can torch.compile's fused kernels run inside the loop's
CUDA graph, and what do they buy?

    python benchmarks/probe_compile.py --out DIR --model CKPT --init pretrained --tokenizer TOK

Each variant is bench_loop.py's measurement (`yoda_raw.train.main`, 16 x 64, 3 warm-up and 20
timed steps) in its own process: --compile-layers off or on, --cuda-graph off or on, with or
without --reuse-dequant, the graph's flat optimizer or bitsandbytes' per-tensor one. A variant
that fails keeps its traceback and TORCH_LOGS=recompiles,graph_breaks output in DIR/VARIANT.log.
DIR/probe_compile.json has every result, with the per-step losses, so the variants' learning can
be compared with the eager loop's.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import report  # noqa: E402

# name: (--compile-layers, --cuda-graph, other options); a "-per-tensor" variant keeps bitsandbytes'
# per-tensor optimizer where the graph's loop would use the flat one (optim.FlatAdamW).
VARIANTS = {
    "eager": (False, "off", []),
    "graph": (False, "on", ["--reuse-dequant", "off"]),
    "layers-eager": (True, "off", []),
    "layers-graph": (True, "on", ["--reuse-dequant", "off"]),
    "layers-graph-per-tensor": (True, "on", ["--reuse-dequant", "off"]),
    "layers-graph-reuse-dequant": (True, "on", ["--reuse-dequant", "on"]),
    "layers-graph-reuse-dequant-per-tensor": (True, "on", ["--reuse-dequant", "on"]),
}


def child(rest: list[str], per_tensor: bool) -> int:
    """bench_loop.py's measurement, and the per-step losses it saw, as a LOSSES line."""
    from benchmarks import bench_loop
    from yoda_raw import optim, train

    if per_tensor:
        train.build_optimizer = lambda *args, flat=False, **kwargs: optim.build_optimizer(*args, **kwargs)

    losses, main = [], train.main

    def main_keeping_losses(cfg):
        run = main(cfg)
        losses.extend(r["loss"] for r in run.fit.log)
        return run

    train.main = main_keeping_losses
    code = bench_loop.main(rest)
    print("LOSSES " + json.dumps(losses), flush=True)
    return code


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="probe_compile.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=",".join(VARIANTS), help="Comma-separated variants.")
    parser.add_argument("--timeout", type=float, default=150, help="Seconds per variant.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--per-tensor", action="store_true", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args.child:
        return child(rest, args.per_tensor)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.only.split(","):
        compiled, graph, other = VARIANTS[variant]
        command = [sys.executable, __file__, "--out", str(out), "--child", *rest, "--cuda-graph", graph]
        command += ["--compile-layers", "on" if compiled else "off", *other]
        command += ["--per-tensor"] if variant.endswith("-per-tensor") else []
        command += ["--batch-size", "16", "--max-length", "64", "--warmup", "3", "--steps", "20"]
        env = os.environ | {"TORCH_LOGS": "recompiles,graph_breaks", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
            text, status = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            text, status = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT", "timeout"
        (out / f"{variant}.log").write_text(text if len(text) < 200_000 else text[-200_000:])
        found = {"variant": variant, "compile_layers": compiled, "cuda_graph": graph}
        found |= {"status": status, "wall_s": round(time.perf_counter() - started, 1)}
        for line in text.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[7:])
                keys = ("tokens_per_s", "step_s", "peak_allocated_gib", "peak_reserved_gib", "device_used_gib")
                found |= {k: r.get(k) for k in keys}
            if line.startswith("LOSSES "):
                found["losses"] = json.loads(line[7:])
        if status != 0:
            found["error_tail"] = [line for line in text.splitlines() if line.strip()][-6:]
        results.append(found)
        (out / "probe_compile.json").write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: v for k, v in found.items() if k != "losses"}), flush=True)
    base = next((r.get("losses") for r in results if r["variant"] == "eager" and r.get("losses")), None)
    for r in results:
        if base and r.get("losses") and len(r["losses"]) == len(base):
            r["worst_rel_vs_eager"] = report.worst_relative_difference(r["losses"], base)
        tps = r.get("tokens_per_s")
        print(
            f"{r['variant']:14} {'-' if tps is None else round(tps):>8} tokens/s  "
            f"{r.get('peak_allocated_gib')} GiB  rel {r.get('worst_rel_vs_eager')}  status {r['status']}"
        )
    (out / "probe_compile.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
