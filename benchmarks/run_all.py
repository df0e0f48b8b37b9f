"""Run the whole benchmark suite, one process per configuration, and write the results.

    source .gpu/env.sh && python benchmarks/run_all.py --out $OUT --name h200      # the H200 suite
    python benchmarks/run_all.py --out $OUT --name h200 --only budgets              # one part of it
    python benchmarks/run_all.py --preset tiny --quick --out /tmp/bench            # a CPU smoke run

What runs, most important first (a time budget skips what no longer fits, and says so):
 1. ours at the tutorial's configuration (16 rows x 64 tokens, 4-bit NF4, gradient checkpointing,
    paged 8-bit AdamW, bf16), with the memory breakdown; then the eager loop (--cuda-graph off),
    and both at 16 x 512;
 2. TRL SFTTrainer with the tutorial's SFTConfig, same model and data (bench_sft.py);
 3. ours with the tutorial's numerics (4-bit compute dtype fp32, frozen weights upcast to fp32),
    and ours without compiled layers (--compile-layers off);
 3b. the same learning: 50 steps of our defaults and of the eager loop from the same seed and data,
    every step's loss compared (report.learning: within 1%);
 4. rows x tokens per step: 4, 16, 64 rows x 64, 256, 1024 tokens (one process, model reloaded
    for each point; the 16 x 64 point is measurement 1; 64 x 1024 in a process of its own);
 5. what fits on a card: 6, 8, 12, 16 and 24 GiB in bf16, 16 GiB in fp16 (a T4), rows of 64, 256
    and 512 tokens (one process per card, see bench_loop.py --cards);
 6. one change at a time from 1: no gradient checkpointing; bf16 base instead of 4-bit; 8-bit
    AdamW; 32-bit AdamW; fp32; fp16;
 6b. what the recompute costs (CUDA only): at 16 x 512 LoRA dropout 0, the last 8, 16, 32 layers
    not checkpointed (--uncheckpointed-layers), no checkpointing; at 16 x 64 the last 2, 3, 4, 6;
 7. with --snapshot: a torch memory snapshot of a few steps of 1 (for pytorch.org/memory_viz).

`--only` takes job names and section names (headline, learning, grid, budgets, variants, checkpointing); `--list`
shows both. Every process loads the same random-weight Phi-3-mini-4k checkpoint, written once at the
start (so no process spends time initialising 3.8B weights), and the driver itself never touches
the GPU (NVML's device-memory reading then sees one process only).

Files written into --out (NAME defaults to the GPU's name): NAME.json (every measurement with the
command, GPU, versions and date), NAME.md and plots (report.py, which re-renders them from the
JSON), NAME.log (everything the processes printed) and, with --snapshot,
NAME_memory_snapshot.pickle. A short table is printed last.
"""

import argparse
import json
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

from benchmarks import common, report  # noqa: E402

HERE = Path(__file__).resolve().parent
GRID_ROWS = (4, 16, 64)
GRID_TOKENS = (64, 256, 1024)
# Cards people train on, and what each computes in: bf16 needs compute capability 8.0+ (RTX 30xx
# and newer); a T4 (Colab's free card) and older cards have fp16 only. Smallest and commonest first.
CARDS = ((6, "bf16"), (8, "bf16"), (12, "bf16"), (16, "fp16"), (16, "bf16"), (24, "bf16"))
CARD_TOKENS = (64, 256, 512)


@dataclass
class Job:
    name: str  # unique, used in file names and tables
    label: str  # what the tables call it
    section: str  # headline | learning | grid | budgets | variants | checkpointing | snapshot
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
        "--quick", action="store_true", help="Fewer steps, a smaller grid and two cards (~1/3 of the time)."
    )
    parser.add_argument("--only", default=None, help="Comma-separated job or section names to run (see --list).")
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
    (at least 3, and no more than 64k tokens' worth); a card search times 2 steps a run."""
    quick = args.quick
    steps = "--warmup 2 --steps 3" if quick else "--warmup 3 --steps 6"
    grid = [f"{r}x{t}" for t in GRID_TOKENS for r in GRID_ROWS if (r, t) not in ((16, 64), (64, 1024))]
    if quick:
        grid = ["4x64", "16x256"]
    if args.preset == "tiny":  # a CPU: small points only
        grid = ["4x64", "16x128"] if quick else ["4x64", "32x64", "4x256", "16x256"]
    base = f"--batch-size 16 --max-length 64 {steps}"
    timed = f"--warmup 2 --steps {3 if quick else 6} --min-steps 3 --timed-tokens 65536"
    numerics = "yoda_raw with the tutorial's numerics (4-bit compute fp32, fp32 frozen weights)"
    jobs = [
        Job("ours", "yoda_raw, our defaults", "headline", "bench_loop.py", f"{base} --breakdown".split()),
        Job("sft", "TRL SFTTrainer, the tutorial's SFTConfig", "headline", "bench_sft.py", base.split()),
        Job("ours-tutorial-numerics", numerics, "headline", "bench_loop.py",
            f"{base} --quant-compute-dtype float32 --fp32-frozen".split()),
        Job("ours-eager", "yoda_raw, eager loop (--cuda-graph off)", "headline", "bench_loop.py",
            f"{base} --cuda-graph off".split()),
        Job("ours-no-compile", "yoda_raw, CUDA graph without compiled layers (--compile-layers off)", "headline",
            "bench_loop.py", f"{base} --compile-layers off".split()),
        Job("ours-bf16", "yoda_raw, bf16 products and torch's dropout (--fp8-matmuls off --seeded-dropout off)",
            "headline", "bench_loop.py", f"{base} --fp8-matmuls off --seeded-dropout off".split(), cuda_only=True),
        Job("ours-no-reuse", "yoda_raw, without reusing dequantized weights (--reuse-dequant off; FP8 off with it)",
            "headline", "bench_loop.py", f"{base} --reuse-dequant off".split()),
        Job("ours-512", "yoda_raw, our defaults, 16 x 512", "headline", "bench_loop.py",
            f"--batch-size 16 --max-length 512 {steps}".split()),
        Job("ours-eager-512", "yoda_raw, eager loop, 16 x 512", "headline", "bench_loop.py",
            f"--batch-size 16 --max-length 512 {steps} --cuda-graph off".split()),
        Job("ours-bf16-512", "yoda_raw, bf16 products and torch's dropout, 16 x 512", "headline", "bench_loop.py",
            f"--batch-size 16 --max-length 512 {steps} --fp8-matmuls off --seeded-dropout off".split(),
            cuda_only=True),
        # The same learning: 50 steps from the same seed and data, our defaults and the eager loop.
        Job("learning-ours", "yoda_raw, our defaults, 50 steps", "learning", "bench_loop.py",
            "--batch-size 16 --max-length 64 --warmup 1 --steps 49".split()),
        Job("learning-eager", "yoda_raw, eager loop, 50 steps", "learning", "bench_loop.py",
            "--batch-size 16 --max-length 64 --warmup 1 --steps 49 --cuda-graph off".split()),
        Job("grid", "rows x tokens", "grid", "bench_loop.py", f"--grid {','.join(grid)} {timed}".split()),
        Job("grid-64x1024", "rows x tokens", "grid", "bench_loop.py", f"--grid 64x1024 {timed}".split(), True),
    ]  # fmt: skip
    cards = [(6, "bf16"), (16, "fp16")] if quick else CARDS
    tokens = "64,512" if quick else ",".join(str(t) for t in CARD_TOKENS)
    for gib, precision in cards:
        name = f"budgets-{gib}gib" + ("-fp16" if precision == "fp16" else "")
        # 2 warm-up steps: with the CUDA graph, the first runs eagerly and the second records the graph.
        card_args = f"--cards {gib} --card-tokens {tokens} --precision {precision} --warmup 2 --steps 2".split()
        jobs.append(Job(name, f"{gib} GiB card, {precision}", "budgets", "bench_loop.py", card_args, True))
    jobs += [
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
    # What the recompute costs, and how much of it memory can buy back (--uncheckpointed-layers).
    long = "--batch-size 16 --max-length 512"
    jobs += [
        Job("no-dropout-512", "16 x 512, LoRA dropout 0 (its share of the element-wise work)", "checkpointing",
            "bench_loop.py", f"{long} {steps} --lora-dropout 0".split(), cuda_only=True),
        *(Job(f"keep-{n}-512", f"16 x 512, the last {n} layers not checkpointed", "checkpointing", "bench_loop.py",
              f"{long} {steps} --uncheckpointed-layers {n}".split(), cuda_only=True) for n in (8, 16, 32)),
        Job("no-checkpointing-512", "16 x 512, no gradient checkpointing", "checkpointing", "bench_loop.py",
            f"{long} {steps} --no-gradient-checkpointing".split(), cuda_only=True),
        *(Job(f"keep-{n}", f"16 x 64, the last {n} layers not checkpointed", "checkpointing", "bench_loop.py",
              f"{base} --uncheckpointed-layers {n}".split(), cuda_only=True) for n in (2, 3, 4, 6)),
    ]  # fmt: skip
    if args.snapshot:
        snapshot_args = "--batch-size 16 --max-length 64 --warmup 1 --steps 2".split()
        jobs.append(
            Job("snapshot", "memory snapshot run (not timed)", "snapshot", "bench_loop.py", snapshot_args, True)
        )
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {j.name for j in jobs} - {j.section for j in jobs}
        if unknown:
            common.fail(f"--only: unknown job(s) {', '.join(sorted(unknown))}; --list shows them")
        jobs = [j for j in jobs if j.name in wanted or j.section in wanted]
    return jobs


def model_args(job: Job, args, checkpoint: str | None) -> list[str]:
    """Where the model, tokenizer and data come from, per script."""
    if args.preset == "tiny":
        return ["--preset", "tiny"]
    tokenizer = str(common.phi3_dir())
    if job.script == "bench_sft.py":
        return ["--model", checkpoint, "--tokenizer", tokenizer]
    return ["--model", checkpoint, "--init", "pretrained", "--tokenizer", tokenizer]


def card_prior(results: list[dict]) -> tuple[float, float] | None:
    """Where a card search guesses first: a line, device memory in use = A + B x tokens per step,
    through the card runs so far, or else through ours and the grid (our defaults, unpressured,
    so it guesses low: the search then goes up). None: bench_loop.py's own prior."""
    card_runs = [
        (p["rows"] * r["card"]["tokens_per_row"], p["device_used_peak_gib"])
        for r in results
        if r.get("card")
        for p in r["card"]["probes"]
        if p["device_used_peak_gib"] is not None and p.get("error") is None
    ]
    defaults = [
        (r["tokens_per_step"], r["device_used_gib"])
        for r in results
        if r.get("section") in ("headline", "grid")
        and r["pipeline"] == "yoda_raw"
        and r.get("device_used_gib")
        and not r["config"]["fp32_frozen"]
        and r["config"]["quant_compute_dtype"] == "auto"
    ]
    return common.line_fit(card_runs) or common.line_fit(defaults)


def known_fit(results: list[dict], job: Job) -> str:
    """TOKENS:ROWS,... the most rows a smaller card in the same precision fitted, for each length:
    they fit this card too, so its search starts above them."""
    card_gib = float(job.args[job.args.index("--cards") + 1])
    precision = job.args[job.args.index("--precision") + 1]
    most: dict[int, int] = {}
    for c in (r["card"] for r in results if r.get("card")):
        if c["precision"] == precision and c["card_gib"] < card_gib:
            most[c["tokens_per_row"]] = max(most.get(c["tokens_per_row"], 0), c["rows_fit"])
    return ",".join(f"{tokens}:{rows}" for tokens, rows in sorted(most.items()) if rows)


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
        if job.section == "budgets":
            prior = card_prior(results)
            # Cards come smallest and commonest first: each may use what is left of the suite's time,
            # less about one search, which it may still finish; later cards are skipped, and said so.
            extra += ["--time-budget-s", f"{max(timeout_s - 60, 0):.0f}"]
            extra += ["--card-prior", f"{prior[0]:g},{prior[1]:g}"] if prior else []
            known = known_fit(results, job)
            extra += ["--known-fit", known] if known else []
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
            print(f"{job.name:24} {job.section:13} {job.script:14} {' '.join(job.args)}")
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
    print(report.short_table(suite))
    return 0 if not suite["failed"] else 1


def say(started: float, message: str) -> None:
    print(f"[{time.perf_counter() - started:5.0f} s] {message}", flush=True)


def short(result: dict) -> str:
    memory = f", {result['peak_allocated_gib']:.2f} GiB" if result.get("peak_allocated_gib") is not None else ""
    return f"{result['name']} {report.fmt(result['tokens_per_s'], 0)} tokens/s{memory}"


# --- outputs -------------------------------------------------------------------------------------


def write_outputs(suite: dict, out: Path, name: str, started: float, plots: bool = False) -> None:
    suite["wall_s"] = round(time.perf_counter() - started, 1)
    suite["comparison"] = report.comparison(suite["results"])
    suite["learning"] = report.learning(suite["results"])
    (out / f"{name}.json").write_text(json.dumps(suite, indent=1) + "\n")
    report.write_report(suite, out, name, plots)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
