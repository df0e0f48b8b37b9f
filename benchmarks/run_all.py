"""Run the whole benchmark suite, one process per configuration, and write the results.

    source .gpu/env.sh && python benchmarks/run_all.py --out $OUT --name h200      # the H200 suite
    python benchmarks/run_all.py --preset tiny --quick --out /tmp/bench            # a CPU smoke run

What runs, most important first (a time budget skips what no longer fits, and says so):
 1. ours at the tutorial's configuration (16 rows x 64 tokens, 4-bit NF4, gradient checkpointing,
    paged 8-bit AdamW, bf16), with the memory breakdown;
 2. TRL SFTTrainer with the tutorial's SFTConfig, same model and data (bench_sft.py);
 3. ours with the tutorial's numerics (4-bit compute dtype fp32, frozen weights upcast to fp32);
 4. rows x tokens per step: 4, 16, 64 rows x 64, 256, 1024 tokens (one process, model reloaded
    for each point; the 16 x 64 point is measurement 1);
 5. consumer-card budgets, 6/8/12/16/24 GiB, emulated (one process, see bench_loop.py);
 6. one change at a time from 1: no gradient checkpointing; bf16 base instead of 4-bit; 8-bit
    AdamW; 32-bit AdamW; fp32; fp16;
 7. with --snapshot: a torch memory snapshot of a few steps of 1 (for pytorch.org/memory_viz).

Every process loads the same random-weight Phi-3-mini-4k checkpoint, written once at the start
(so no process spends time initialising 3.8B weights), and the driver itself never touches the
GPU (NVML's device-memory reading then sees one process only).

Files written into --out (NAME defaults to the GPU's name): NAME.json (every measurement with the
command, GPU, versions and date), NAME.md (the tables), NAME_sweep.png and NAME_memory.png (when
matplotlib is installed), NAME.log (everything the processes printed) and, with --snapshot,
NAME_memory_snapshot.pickle. A short table is printed last.
"""

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

HERE = Path(__file__).resolve().parent
GRID_ROWS = (4, 16, 64)
GRID_TOKENS = (64, 256, 1024)
BUDGETS_GIB = (6, 8, 12, 16, 24)
BUDGET_TOKENS = 512
# Prior for the budget search when no grid result exists: peak reserved ~ A + B x tokens per step
# for Phi-3-mini QLoRA with checkpointing, a line a little above the peak allocated an eager loop
# measured on an H200 (2.86 GiB at 16x64, 4.75 at 64x64, 7.25 at 16x512): reserved runs higher.
PRIOR_A_GIB, PRIOR_B_GIB_PER_TOKEN = 2.3, 0.0007
CUDA_CONTEXT_GIB = 0.6  # an upper guess, only to choose where a budget search starts


@dataclass
class Job:
    name: str  # unique, used in file names and tables
    label: str  # what the tables call it
    section: str  # headline | grid | budgets | variants | snapshot
    script: str  # bench_loop.py | bench_sft.py
    args: list[str] = field(default_factory=list)
    cuda_only: bool = False


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_all.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--out", required=True, help="Folder for the result files (created).")
    parser.add_argument("--name", default=None, help="Base name of the files (default: from the GPU, e.g. h200).")
    parser.add_argument(
        "--preset",
        choices=["tutorial", "tiny"],
        default="tutorial",
        help="tutorial: Phi-3-mini-4k with random weights (GPU). tiny: the tiny model, a CPU smoke run.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="Fewer steps, a smaller grid and two budgets (~1/3 of the time)."
    )
    parser.add_argument("--only", default=None, help="Comma-separated job names to run (see --list).")
    parser.add_argument("--list", action="store_true", help="List the jobs and exit.")
    parser.add_argument("--snapshot", action="store_true", help="Also record a torch memory snapshot (CUDA only).")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=510.0,
        help="Skip jobs that would start after this many seconds, and stop a running one there (default 510).",
    )
    parser.add_argument(
        "--checkpoint", default=None, help="Reuse this random-weight checkpoint folder instead of writing one."
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Peak TFLOP/s for MFU (default: yoda_raw/meter.py's for the GPU).",
    )
    return parser.parse_args(argv)


# --- the plan ----------------------------------------------------------------------------------------


def plan(args) -> list[Job]:
    """The jobs, most important first. Step counts keep the full H200 suite near 7-8 minutes:
    3 warm-up + 6 timed steps at 16 x 64; the grid times fewer steps where a step is large
    (at least 3, and no more than 64k tokens' worth); budgets time 3 steps each."""
    quick = args.quick
    steps = "--warmup 2 --steps 3" if quick else "--warmup 3 --steps 6"
    grid = [f"{r}x{t}" for t in GRID_TOKENS for r in GRID_ROWS if (r, t) != (16, 64)]
    if quick:
        grid = ["4x64", "16x256", "64x1024"]
    if args.preset == "tiny":  # a CPU: small points only
        grid = ["4x64", "16x128"] if quick else ["4x64", "32x64", "4x256", "16x256"]
    budgets = [6, 24] if quick else list(BUDGETS_GIB)
    base = f"--batch-size 16 --max-length 64 {steps}"
    grid_args = f"--grid {','.join(grid)} --warmup 2 --steps {3 if quick else 6} --min-steps 3 --timed-tokens 65536"
    budget_args = (
        f"--budget-gib {','.join(str(b) for b in budgets)} --budget-tokens {BUDGET_TOKENS} --warmup 2 --steps 3"
    )
    numerics = "yoda_raw with the tutorial's numerics (4-bit compute fp32, fp32 frozen weights)"
    jobs = [
        Job("ours", "yoda_raw, our defaults", "headline", "bench_loop.py", f"{base} --breakdown".split()),
        Job("sft", "TRL SFTTrainer, the tutorial's SFTConfig", "headline", "bench_sft.py", base.split()),
        Job("ours-tutorial-numerics", numerics, "headline", "bench_loop.py",
            f"{base} --quant-compute-dtype float32 --fp32-frozen".split()),
        Job("ours-eager", "yoda_raw, eager loop (--cuda-graph off)", "headline", "bench_loop.py",
            f"{base} --cuda-graph off".split()),
        Job("ours-512", "yoda_raw, our defaults, 16 x 512", "headline", "bench_loop.py",
            f"--batch-size 16 --max-length 512 {steps}".split()),
        Job("ours-eager-512", "yoda_raw, eager loop, 16 x 512", "headline", "bench_loop.py",
            f"--batch-size 16 --max-length 512 {steps} --cuda-graph off".split()),
        Job("grid", "rows x tokens", "grid", "bench_loop.py", grid_args.split()),
        Job("budgets", "emulated cards", "budgets", "bench_loop.py", budget_args.split(), cuda_only=True),
        Job("no-checkpointing", "no gradient checkpointing", "variants", "bench_loop.py",
            f"{base} --no-gradient-checkpointing".split()),
        Job("bf16-base", "bf16 base instead of 4-bit (LoRA, not QLoRA)", "variants", "bench_loop.py",
            f"{base} --quant none".split(), cuda_only=True),
        Job("adamw-8bit", "8-bit AdamW (not paged)", "variants", "bench_loop.py", f"{base} --optim adamw_8bit".split()),
        Job("adamw", "32-bit AdamW (torch)", "variants", "bench_loop.py", f"{base} --optim adamw".split()),
        Job("fp32", "fp32 compute (no autocast; 4-bit compute fp32)", "variants", "bench_loop.py",
            f"{base} --precision fp32".split()),
        Job("fp16", "fp16 autocast with loss scaling", "variants", "bench_loop.py",
            f"{base} --precision fp16".split(), cuda_only=True),
    ]  # fmt: skip
    if args.snapshot:
        snapshot_args = "--batch-size 16 --max-length 64 --warmup 1 --steps 2".split()
        jobs.append(
            Job("snapshot", "memory snapshot run (not timed)", "snapshot", "bench_loop.py", snapshot_args, True)
        )
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {j.name for j in jobs}
        if unknown:
            common.fail(f"--only: unknown job(s) {', '.join(sorted(unknown))}; --list shows them")
        jobs = [j for j in jobs if j.name in wanted]
    return jobs


def model_args(job: Job, args, checkpoint: str | None) -> list[str]:
    """Where the model, tokenizer and data come from, per script."""
    if args.preset == "tiny":
        return ["--preset", "tiny"]
    tokenizer = str(common.phi3_dir())
    if job.script == "bench_sft.py":
        return ["--model", checkpoint, "--tokenizer", tokenizer]
    return ["--model", checkpoint, "--init", "pretrained", "--tokenizer", tokenizer]


def budget_start_rows(results: list[dict], budgets: list[float]) -> list[int]:
    """Rows to start each budget's search from: 25% above what a straight line through the peak
    reserved memory of the measurements so far (default configuration) predicts, or the prior.
    The search only goes down (x0.9 per out-of-memory), so it must start above the answer."""
    points = [
        (r["tokens_per_step"], r["peak_reserved_gib"])
        for r in results
        if r.get("section") in ("headline", "grid")
        and r["pipeline"] == "yoda_raw"
        and r.get("peak_reserved_gib")
        and not r["config"]["fp32_frozen"]
        and r["config"]["quant_compute_dtype"] == "auto"
    ]
    a, b = PRIOR_A_GIB, PRIOR_B_GIB_PER_TOKEN
    if len(points) >= 2:
        n = len(points)
        mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
        sxx = sum((x - mx) ** 2 for x, _ in points)
        if sxx > 0:
            b = max(sum((x - mx) * (y - my) for x, y in points) / sxx, 1e-5)
            a = my - b * mx
    starts = []
    for budget in budgets:
        tokens = max(0.0, budget - CUDA_CONTEXT_GIB - a) / b
        starts.append(max(2, math.ceil(1.25 * tokens / BUDGET_TOKENS) + 1))
    return starts


# --- running -------------------------------------------------------------------------------------


def run_job(
    job: Job, args, checkpoint: str | None, results: list[dict], timeout_s: float, log
) -> tuple[list[dict], str | None]:
    """One job in its own process; returns its results and an error (or None)."""
    with tempfile.TemporaryDirectory(prefix="run_all_") as tmp:
        out_json = Path(tmp) / "result.jsonl"
        extra = ["--name", job.name, "--json", str(out_json)]
        if args.peak_tflops:
            extra += ["--peak-tflops", str(args.peak_tflops)]
        if job.name == "budgets":
            budgets = [float(b) for b in job.args[job.args.index("--budget-gib") + 1].split(",")]
            extra += ["--budget-start-rows", ",".join(str(r) for r in budget_start_rows(results, budgets))]
        if job.name == "snapshot":
            extra += ["--snapshot", str(Path(args.out) / f"{args.name}_memory_snapshot.pickle")]
        command = [sys.executable, str(HERE / job.script), *model_args(job, args, checkpoint), *job.args, *extra]
        log.write(f"\n===== {job.name}: {shlex.join(command)}\n")
        log.flush()
        env = os.environ | {"TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=common.ROOT, timeout=timeout_s
            )
            error = None if done.returncode == 0 else f"exit status {done.returncode} (see the log)"
        except subprocess.TimeoutExpired:
            error = f"stopped after {timeout_s:.0f} s: the suite's time budget ran out"
        found = common.read_jsonl(out_json) if out_json.exists() else []
    for result in found:
        result |= {"job": job.name, "label": job.label, "section": job.section, "command": shlex.join(command[1:])}
    return found, error


def make_checkpoint(folder: str, log) -> None:
    source = str(common.phi3_dir())
    code = f"from benchmarks.common import save_random_checkpoint as save; save({source!r}, {folder!r})"
    log.write(f"\n===== random checkpoint -> {folder}\n")
    log.flush()
    subprocess.run([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT, check=True)


def gpu_facts() -> dict:
    """GPU name, driver and memory from nvidia-smi (no CUDA context in this process)."""
    try:
        line = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            .stdout.strip()
            .splitlines()[0]
        )
    except (OSError, subprocess.SubprocessError, IndexError):
        return {"gpu": None}
    name, driver, memory = (part.strip() for part in line.split(","))
    return {"gpu": name, "driver": driver, "gpu_memory": memory}


def default_name(gpu: str | None, preset: str) -> str:
    if preset == "tiny" or not gpu:
        return "cpu-tiny" if preset == "tiny" else "gpu"
    words = [w for w in gpu.lower().replace("nvidia", "").split() if w]
    return "-".join(words)[:40] or "gpu"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    jobs = plan(args)
    if args.list:
        for job in jobs:
            print(f"{job.name:24} {job.script:14} {' '.join(job.args)}")
        return 0
    started = time.perf_counter()
    facts = gpu_facts()
    on_cuda = facts["gpu"] is not None
    args.name = args.name or default_name(facts["gpu"], args.preset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suite = {
        "suite": "yoda_raw benchmarks",
        "name": args.name,
        "command": shlex.join(["python", *sys.argv]),
        "date_utc": common.now_utc(),
        **facts,
        "versions": common.versions(),
        "preset": args.preset,
        "quick": args.quick,
        "time_budget_s": args.time_budget_s,
        "results": [],
        "failed": [],
        "skipped": [],
    }
    log_path = out / f"{args.name}.log"
    checkpoint = args.checkpoint
    own_checkpoint = None
    with open(log_path, "w") as log:
        try:
            if args.preset == "tutorial" and not checkpoint:
                if not common.phi3_dir().is_dir():
                    common.fail(
                        f"{common.phi3_dir()} not found: set YODA_RAW_DATA (source .gpu/env.sh on the GPU machine)"
                    )
                own_checkpoint = checkpoint = tempfile.mkdtemp(prefix="yoda_raw_bench_phi3_random_")
                make_checkpoint(checkpoint, log)
                say(started, f"random-weight checkpoint written to {checkpoint}")
            for job in jobs:
                left = args.time_budget_s - (time.perf_counter() - started)
                if job.cuda_only and not on_cuda:
                    suite["skipped"].append({"job": job.name, "reason": "needs a CUDA GPU"})
                    continue
                if left < 20:
                    suite["skipped"].append(
                        {"job": job.name, "reason": f"time budget ({args.time_budget_s:.0f} s) spent"}
                    )
                    say(started, f"{job.name}: skipped, time budget spent")
                    continue
                found, error = run_job(job, args, checkpoint, suite["results"], left, log)
                suite["results"] += found
                if error:
                    suite["failed"].append({"job": job.name, "error": error})
                say(started, f"{job.name}: " + (error or "") + "; ".join(short(r) for r in found))
                write_outputs(suite, out, args.name, started)
        finally:
            if own_checkpoint:
                shutil.rmtree(own_checkpoint, ignore_errors=True)
    write_outputs(suite, out, args.name, started, plots=True)
    print()
    print(short_table(suite))
    return 0 if not suite["failed"] else 1


def say(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {message}", flush=True)


def short(result: dict) -> str:
    memory = f", {result['peak_allocated_gib']:.2f} GiB" if result.get("peak_allocated_gib") is not None else ""
    return f"{result['name']} {result['tokens_per_s']:.0f} tokens/s{memory}"


# --- outputs -------------------------------------------------------------------------------------


def write_outputs(suite: dict, out: Path, name: str, started: float, plots: bool = False) -> None:
    suite["wall_s"] = round(time.perf_counter() - started, 1)
    suite["comparison"] = comparison(suite["results"])
    (out / f"{name}.json").write_text(json.dumps(suite, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(suite, name))
    if plots:
        try:
            write_plots(suite, out, name)
        except ImportError:
            print("matplotlib not installed: no plots", file=sys.stderr)


def by_job(results: list[dict], job: str) -> dict | None:
    return next((r for r in results if r.get("job") == job), None)


def comparison(results: list[dict]) -> dict:
    """Ours / SFTTrainer at the tutorial's configuration: tokens/s and peak memory ratios."""
    sft = by_job(results, "sft")
    ratios = {}
    for job in ("ours", "ours-tutorial-numerics"):
        ours = by_job(results, job)
        if not (ours and sft):
            continue
        ratios[job] = {
            "tokens_per_s_ratio": round(ours["tokens_per_s"] / sft["tokens_per_s"], 3),
            "step_s_ratio": round(ours["step_s"] / sft["step_s"], 3),
        }
        for key in ("peak_allocated_gib", "peak_reserved_gib", "device_used_gib"):
            if ours.get(key) and sft.get(key):
                ratios[job][key.replace("_gib", "_ratio")] = round(ours[key] / sft[key], 3)
    return ratios


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def row_of(result: dict, label: str | None = None) -> str:
    c = result["config"]
    mfu = f"{100 * result['mfu']:.1f}%" if result.get("mfu") is not None else "–"
    return (
        f"| {label or result['label']} | {c['rows']} x {c['tokens_per_row']} | {fmt(result['step_s'], 3)} | "
        f"{fmt(result['tokens_per_s'], 0)} | {fmt(result['supervised_tokens_per_s'], 0)} | {mfu} | "
        f"{fmt(result['peak_allocated_gib'])} | {fmt(result['peak_reserved_gib'])} | {fmt(result['device_used_gib'])} |"
    )


FIGURES_HEADER = (
    "| configuration | rows x tokens | step (s) | tokens/s | supervised tokens/s | MFU | peak allocated (GiB) "
    "| peak reserved (GiB) | device used, NVML (GiB) |\n|---|---|---|---|---|---|---|---|---|"
)


def markdown(suite: dict, name: str) -> str:
    results = suite["results"]
    v = suite["versions"]
    lines = [
        f"# yoda_raw benchmarks: {name}",
        "",
        f"Measured {suite['date_utc']} on {suite.get('gpu') or (results[0]['device'] if results else 'a CPU')}"
        + (f" (driver {suite['driver']}, {suite['gpu_memory']})" if suite.get("driver") else "")
        + f"; torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, accelerate {v['accelerate']}, "
        f"bitsandbytes {v['bitsandbytes']}, trl {v['trl']}; python {v['python']}.",
        "",
        f"Command: `{suite['command']}`"
        + (" (quick mode)" if suite["quick"] else "")
        + f"; the suite took {suite.get('wall_s', 0):.0f} s.",
        "",
        "Model: "
        + (
            "the tiny Phi-3 of `--preset tiny`"
            if suite["preset"] == "tiny"
            else "the Phi-3-mini-4k architecture (3.82B parameters) with random weights"
        )
        + "; LoRA r=8 on o_proj, qkv_proj, gate_up_proj, down_proj; data: "
        + ("the tiny preset's pairs" if suite["preset"] == "tiny" else "the yoda set")
        + ", wrapped-packed into full rows "
        "(repeated where a configuration needs more rows). Each configuration runs in its own process unless noted. "
        "Step time: end of one optimizer step to the end of the next, after a GPU sync; median over the timed steps "
        "after warm-up. Tokens: non-pad input tokens; supervised: tokens with a label (ours: assistant tokens only, "
        "SFTTrainer: all). MFU: (4 x frozen + 6 x trainable parameters) FLOPs per token x tokens/s over the GPU's "
        "dense bf16 peak (all parameters counted, embeddings too)"
        + (f" ({results[0]['peak_tflops']:.0f} TFLOP/s)" if results and results[0].get("peak_tflops") else "")
        + ", recompute not counted. Memory: torch peak allocated and peak reserved over the training loop; "
        "device used: the most NVML saw at a step end (it also counts the CUDA context and the paged optimizer state).",
        "",
    ]
    headline = [r for r in results if r.get("section") == "headline"]
    if headline:
        lines += ["## Ours vs TRL SFTTrainer at the tutorial's configuration", "", FIGURES_HEADER]
        lines += [row_of(r) for r in headline]
        for job, ratio in suite["comparison"].items():
            label = by_job(results, job)["label"]
            parts = [f"tokens/s x{ratio['tokens_per_s_ratio']:.2f}"]
            parts += [
                f"{k.replace('_ratio', '').replace('_', ' ')} x{ratio[k]:.2f}"
                for k in ("peak_allocated_ratio", "peak_reserved_ratio", "device_used_ratio")
                if k in ratio
            ]
            lines += ["", f"{label} / SFTTrainer: " + ", ".join(parts) + "."]
        lines += [""]
    grid = {(r["config"]["rows"], r["config"]["tokens_per_row"]): r for r in results if r.get("section") == "grid"}
    ours = by_job(results, "ours")
    if grid and ours:
        grid.setdefault((ours["config"]["rows"], ours["config"]["tokens_per_row"]), ours)
    if grid:
        rows = sorted({k[0] for k in grid})
        tokens = sorted({k[1] for k in grid})
        lines += [
            "## Rows x tokens per step (our defaults)",
            "",
            "tokens/s, and peak allocated GiB in brackets; rows per step down, tokens per row across.",
            "",
            "| rows \\ tokens | " + " | ".join(str(t) for t in tokens) + " |",
            "|---|" + "---|" * len(tokens),
        ]
        for r in rows:
            cells = [
                f"{grid[(r, t)]['tokens_per_s']:,.0f} ({fmt(grid[(r, t)]['peak_allocated_gib'])})"
                if (r, t) in grid
                else ""
                for t in tokens
            ]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        shared = next((r.get("shared_process") for r in grid.values() if r.get("shared_process")), None)
        if shared:
            lines += [
                "",
                f"Grid points other than 16 x 64 ran in one process ({shared}), the model reloaded and memory "
                "freed before each; `allocated_at_start_gib` in the JSON shows each started clean.",
            ]
        lines += [""]
    variants = [r for r in results if r.get("section") == "variants"]
    if variants and ours:
        lines += [
            "## One change at a time from our defaults",
            "",
            FIGURES_HEADER,
            row_of(ours, "our defaults (4-bit, checkpointing, paged 8-bit AdamW, bf16)"),
        ]
        lines += [row_of(r) for r in variants]
        lines += [""]
    if ours and ours.get("memory_breakdown") and "activations_at_peak_gib" in ours["memory_breakdown"]:
        lines += breakdown_table(ours["memory_breakdown"]) + [""]
    budgets = [r for r in results if r.get("section") == "budgets"]
    if budgets:
        lines += budgets_table(budgets) + [""]
    if suite["failed"] or suite["skipped"]:
        lines += ["## Not measured", ""]
        lines += [f"- {f['job']}: failed, {f['error']}" for f in suite["failed"]]
        lines += [f"- {s['job']}: skipped, {s['reason']}" for s in suite["skipped"]]
        lines += [""]
    return "\n".join(lines)


BREAKDOWN_PARTS = [
    ("weights_4bit_gib", "4-bit weights (NF4, 0.5 byte each) and their quantization state", "counted"),
    ("weights_other_gib", "other weights and buffers (embeddings, LM head, norms; not quantized)", "counted"),
    ("lora_params_gib", "LoRA parameters", "counted"),
    ("lora_grads_gib", "their gradients", "counted"),
    ("optimizer_state_gib", "optimizer state in device memory", "counted"),
    ("activations_at_peak_gib", "activations and temporaries at the peak", "peak allocated - the above"),
    (
        "allocator_beyond_allocated_gib",
        "held by torch's allocator beyond that (cache, fragmentation)",
        "peak reserved - peak allocated",
    ),
]


def breakdown_table(b: dict) -> list[str]:
    lines = ["## Where the memory goes (ours, tutorial configuration)", "", "| part | GiB | how |", "|---|---|---|"]
    lines += [f"| {label} | {b[key]:.3f} | {how} |" for key, label, how in BREAKDOWN_PARTS]
    lines += [
        f"| **peak reserved** (= the sum) | **{b['peak_reserved_gib']:.3f}** | torch.cuda.max_memory_reserved |",
        f"| paged optimizer state (unified memory, not in torch's counters) | {b['optimizer_state_paged_gib']:.3f} "
        "| counted |",
    ]
    if b.get("outside_torch_gib") is not None:
        lines += [
            f"| outside torch: CUDA context, paged state, libraries | {b['outside_torch_gib']:.3f} "
            "| NVML used - reserved |",
            f"| **device used (NVML)** | **{b['device_used_gib']:.3f}** | nvidia-ml-py |",
        ]
    verdict = "within" if b.get("adds_up") else "NOT within"
    lines += [
        "",
        "Check: the counted weights and LoRA parameters differ from torch.cuda.memory_allocated() after loading by "
        f"{fmt(b.get('mismatch_after_load_gib'), 3)} GiB, and weights + LoRA + optimizer state differ from it after "
        f"the loop by {fmt(b.get('mismatch_after_loop_gib'), 3)} GiB ({verdict} the tolerance of "
        f"{b['tolerance_gib']} GiB). Gradients are counted whole; at the peak only part of them may exist yet, so "
        "activations may be understated by up to their size.",
    ]
    return lines


def budgets_table(budgets: list[dict]) -> list[str]:
    first = budgets[0]
    lines = [
        "## What fits on a smaller card (Phi-3-mini QLoRA, our defaults)",
        "",
        f"Emulated on the {first['device']}: torch.cuda.set_per_process_memory_fraction caps torch's allocator at "
        f"the card's size minus this process's CUDA context ({first['budget']['cuda_context_gib']:.2f} GiB here), "
        f"then the loop's --auto-batch-size finds the most rows of {first['config']['tokens_per_row']} tokens that "
        "train: it starts above the answer and retries with 0.9x the rows on out-of-memory, so the answer is within "
        "~10% of the limit. A real card also loses memory to the display and other programs: leave some margin.",
        "",
        "| card (GiB) | rows x tokens | tokens per step | tokens/s | step (s) | peak reserved (GiB) "
        "| device used, NVML (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(budgets, key=lambda r: r["budget"]["budget_gib"]):
        c, b = r["config"], r["budget"]
        note = " (the start fit: maybe more)" if b.get("start_fit") else ""
        cells = [
            f"{b['budget_gib']:g}",
            f"{c['rows']} x {c['tokens_per_row']}{note}",
            f"{c['rows'] * c['tokens_per_row']:,}",
            f"{r['tokens_per_s']:,.0f}",
            fmt(r["step_s"], 3),
            fmt(r["peak_reserved_gib"]),
            fmt(r["device_used_gib"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def short_table(suite: dict) -> str:
    lines = [f"{'job':32} {'rows x tokens':>14} {'step s':>8} {'tokens/s':>10} {'peak alloc GiB':>15}"]
    for r in suite["results"]:
        c = r["config"]
        lines.append(
            f"{r['name']:32} {c['rows']:>7} x {c['tokens_per_row']:<5} {r['step_s']:>8.3f} {r['tokens_per_s']:>10,.0f} "
            f"{fmt(r['peak_allocated_gib']):>15}"
        )
    for job, ratio in suite["comparison"].items():
        lines.append(
            f"{job} / sft: tokens/s x{ratio['tokens_per_s_ratio']:.2f}"
            + (f", peak allocated x{ratio['peak_allocated_ratio']:.2f}" if "peak_allocated_ratio" in ratio else "")
        )
    lines += [f"FAILED {f['job']}: {f['error']}" for f in suite["failed"]]
    lines += [f"skipped {s['job']}: {s['reason']}" for s in suite["skipped"]]
    return "\n".join(lines)


def write_plots(suite: dict, out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = suite["results"]
    grid = [r for r in results if r.get("section") == "grid"] + [r for r in results if r.get("job") == "ours"]
    if grid:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for rows in sorted({r["config"]["rows"] for r in grid}):
            points = [
                (r["config"]["rows"] * r["config"]["tokens_per_row"], r) for r in grid if r["config"]["rows"] == rows
            ]
            points.sort(key=lambda point: point[0])
            xs = [x for x, _ in points]
            left.plot(xs, [r["tokens_per_s"] for _, r in points], "o-", label=f"{rows} rows")
            if all(r.get("peak_allocated_gib") is not None for _, r in points):
                right.plot(xs, [r["peak_allocated_gib"] for _, r in points], "o-", label=f"{rows} rows")
        for ax, ylabel in ((left, "tokens/s (non-pad)"), (right, "peak allocated (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per step (rows x tokens per row)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"yoda_raw, Phi-3-mini QLoRA: rows x tokens sweep ({suite.get('gpu') or 'CPU'})")
        fig.tight_layout()
        fig.savefig(out / f"{name}_sweep.png", dpi=110)
        plt.close(fig)
    ours = by_job(results, "ours")
    budgets = sorted((r for r in results if r.get("section") == "budgets"), key=lambda r: r["budget"]["budget_gib"])
    breakdown = (ours or {}).get("memory_breakdown") or {}
    if "activations_at_peak_gib" in breakdown or budgets:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        if "activations_at_peak_gib" in breakdown:
            bottom = 0.0
            for key, label, _ in BREAKDOWN_PARTS:
                value = max(breakdown[key], 0.0)
                left.bar(["ours, 16 x 64"], [value], bottom=bottom, label=label.split(" (")[0])
                bottom += value
            sft = by_job(results, "sft")
            if sft and sft.get("peak_reserved_gib"):
                left.bar(
                    ["SFTTrainer, 16 x 64"], [sft["peak_reserved_gib"]], color="grey", label="SFTTrainer peak reserved"
                )
            left.set_ylabel("GiB")
            left.set_title("peak memory, by part")
            left.legend(fontsize=7)
        if budgets:
            labels = [
                f"{r['budget']['budget_gib']:g} GiB\n{r['config']['rows']} x {r['config']['tokens_per_row']}"
                for r in budgets
            ]
            right.bar(labels, [r["tokens_per_s"] for r in budgets], color="tab:green")
            right.set_ylabel("tokens/s")
            right.set_title("largest rows x tokens that fit (emulated cards)")
        fig.tight_layout()
        fig.savefig(out / f"{name}_memory.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
