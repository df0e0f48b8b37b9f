"""Where a training step's time goes: a torch.profiler run of the real loop, split by kind of work.

    python benchmarks/profile_step.py --out DIR [run.py options]        # e.g. --cuda-graph
    python benchmarks/profile_step.py --out DIR --preset tiny --warmup 1 --steps 2   # a CPU smoke run

It runs `yoda_raw.train.main` (what run.py runs) for warm-up + profiled steps; the profiler records
the profiled steps only (a hook on every optimizer step advances its schedule). Every GPU kernel of
those steps is put in one bucket by its name, and the table gives each bucket's GPU time per step:

    4-bit dequantization | matmuls | attention | loss | optimizer and clipping |
    element-wise and other (norms, rotary, LoRA scale and add, dropout, copies, casts)

plus the kernels launched per step, and the time the GPU sits idle: the step's wall time minus the
kernels' time (kernels of one stream do not overlap), i.e. the GPU waiting for the host to launch
the next kernel, or (with --offload-activations) for a copy to or from host memory. Those copies
run on a stream of their own, beside the kernels: their time is a row of its own, not in the sum.
Where the GPU waits: each gap between one kernel's end and the next one's start is put on the
kernel that ends it (what the GPU waited to start), and the kernels with the most gap time are
listed. Writes DIR/NAME.md (the tables and the 15 costliest kernels), DIR/NAME.json and
DIR/NAME_trace.json (open it in https://ui.perfetto.dev).
"""

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # yoda_raw and benchmarks/

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from benchmarks import common  # noqa: E402

# Kernel name -> bucket, first match wins. Names are those of bitsandbytes, cuBLAS/CUTLASS and
# PyTorch's own kernels on CUDA 12-13 (a kernel no rule matches counts as element-wise and other).
BUCKETS = [
    ("4-bit dequantization", r"dequantize|kDequant"),
    ("optimizer and clipping", r"kOptimizer|optimizer|adam|kPreconditionOptimizer|norm_kernel|foreach_norm|clip"),
    ("attention", r"flash|fmha|attention|attn"),
    ("loss", r"cross_entropy|log_softmax|softmax_warp|nll_loss"),
    ("matmuls", r"gemm|xmma|nvjet|cutlass|sm90|sm80|ampere|hopper|splitK|matmul"),
]
OTHER = "element-wise and other"
# Copies between the GPU and host memory (--offload-activations runs them on a stream of its own,
# beside the kernels): a bucket of their own, left out of the kernels' time, so that the GPU's idle
# time stays the main stream's. The few small copies of a step's data count there too.
HOST_COPIES = "copies to and from host memory (beside the kernels)"
GAP_MIN_US = 20  # a shorter gap between kernels is a launch's own latency, not a wait
# What the host does meanwhile: CPU time per step inside these ranges (they may nest: not a sum).
# The profiler itself waits for the GPU only at the window's edges (see on_step); the wait at its end
# falls inside the last step's optimizer range and is counted below, once in the whole window.
# (Until a75bce7 it waited at every step's end; until this version, never, which let kernels of the
# step before the window run inside it.)
HOST = [
    ("waiting for the GPU (synchronize)", r"^cuda(Device|Stream|Event)Synchronize$"),
    ("optimizer step (host)", r"^Optimizer\.step#"),
    ("data loader", r"^enumerate\(DataLoader\)"),
    ("graph launch", r"^cudaGraphLaunch$"),
]


def bucket_of(kernel_name: str) -> str:
    """
    >>> bucket_of("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, ...)")
    '4-bit dequantization'
    >>> bucket_of("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT")
    'matmuls'
    >>> bucket_of("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>")
    'element-wise and other'
    >>> bucket_of("Memcpy DtoH (Device -> Pinned)")
    'copies to and from host memory (beside the kernels)'
    """
    if re.search(common.HOST_COPY, kernel_name):
        return HOST_COPIES
    for name, pattern in BUCKETS:
        if re.search(pattern, kernel_name, re.IGNORECASE):
            return name
    return OTHER


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="profile_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Folder for NAME.md, NAME.json and NAME_trace.json.")
    parser.add_argument("--name", default="profile", help="File name stem (default: profile).")
    parser.add_argument("--warmup", type=int, default=5, help="Steps before profiling starts (default 5).")
    parser.add_argument("--steps", type=int, default=5, help="Profiled steps (default 5).")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    args, rest = parse_args(argv)
    import run
    from yoda_raw import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir = [
        "--output-dir",
        str(Path(tempfile.mkdtemp(prefix="profile_run_"))),
        "--overwrite",
    ]  # options may override
    steps = ["--max-steps", str(args.warmup + args.steps + 1), "--logging-steps", "1000", "--no-samples"]
    cfg = run.parse_config([*run_dir, *rest, *steps])
    on_cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    step_ends = []

    def on_step(*_):  # after every optimizer step: mark its end, advance the profiler's schedule
        # On CUDA a timed event queued behind the step's work, not a wait: the host runs ahead of
        # the GPU as it does in the loop, so the GPU's idle time below is the loop's own. Two waits
        # only, at the window's edges: before the first profiled step, so that no kernel of an
        # earlier step runs inside the window (the host is up to a step ahead), and after the
        # last, so that all of its kernels are recorded before the profiler stops. The first
        # costs the first profiled step the host's time to launch it (a few ms, counted as idle).
        if on_cuda:
            step_ends.append(torch.cuda.Event(enable_timing=True))
            step_ends[-1].record()
            if len(step_ends) in (args.warmup, args.warmup + args.steps):
                torch.cuda.synchronize()
        else:
            step_ends.append(time.perf_counter())
        profiler.step()

    schedule = torch.profiler.schedule(wait=args.warmup - 1, warmup=1, active=args.steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as profiler:
        hook = register_optimizer_step_post_hook(on_step)
        try:
            train.main(cfg)
        finally:
            hook.remove()
    profiler.export_chrome_trace(str(out / f"{args.name}_trace.json"))

    # The profiled steps are those between the warm-up's last step end and the last profiled one.
    first, last = step_ends[args.warmup - 1], step_ends[args.warmup + args.steps - 1]
    if on_cuda:
        torch.cuda.synchronize()
        wall_s = first.elapsed_time(last) / 1e3 / args.steps  # elapsed_time: milliseconds
    else:
        wall_s = (last - first) / args.steps
    result = split(profiler.events(), args.steps, wall_s, on_cuda)
    result |= {"command": "python benchmarks/profile_step.py " + " ".join(argv), "device": common.device_name()}
    result |= {"versions": common.versions(), "date": common.now_utc()}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.name}.md").write_text(table(result))
    print(table(result))
    return 0


def split(events, steps: int, wall_s: float, on_cuda: bool) -> dict:
    """Kernel time per step by bucket, kernels per step, the top kernels, and the GPU's idle time."""
    per_bucket, per_kernel, launches = defaultdict(float), defaultdict(float), 0
    host, host_calls = defaultdict(float), defaultdict(int)
    for event in events:
        for name, pattern in HOST:
            if event.device_type == torch.autograd.DeviceType.CPU and re.search(pattern, event.name):
                host[name] += event.cpu_time_total / 1e6 / steps
                host_calls[name] += 1
        if event.is_user_annotation:  # ranges, not work: their kernels are counted themselves
            continue
        if on_cuda and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not on_cuda and event.cpu_parent is not None and not event.cpu_parent.is_user_annotation:
            continue  # on a CPU: the outermost ops, their children included
        seconds = (event.device_time_total if on_cuda else event.cpu_time_total) / 1e6 / steps
        per_bucket[bucket_of(event.name)] += seconds
        per_kernel[event.name] += seconds
        launches += 1
    busy_s = sum(seconds for name, seconds in per_bucket.items() if name != HOST_COPIES)
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:15]
    waits = idle_before(events, steps) if on_cuda else []
    return {
        "step_s": round(wall_s, 5),
        "steps": steps,
        "kernel_s": round(busy_s, 5),
        "idle_s": round(max(wall_s - busy_s, 0.0), 5) if on_cuda else None,
        "kernels_per_step": round(launches / steps),
        "buckets_s": {name: round(s, 5) for name, s in sorted(per_bucket.items(), key=lambda item: -item[1])},
        "top_kernels_s": [[name[:120], round(s, 6)] for name, s in top],
        "host_s": {name: round(host[name], 5) for name, _ in HOST},
        "host_calls_per_step": {name: round(host_calls[name] / steps, 2) for name, _ in HOST},
        "idle_before_s": waits,
    }


def idle_before(events, steps: int, top: int = 10) -> list:
    """The kernels the GPU waited longest to start, as [name, seconds of gaps before it a step, gaps
    a step]: every gap of at least GAP_MIN_US between the kernels (host copies left out: they run
    beside them) goes to the kernel that ends it."""
    cuda = torch.autograd.DeviceType.CUDA
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in events
        if e.device_type == cuda and not e.is_user_annotation and not re.search(common.HOST_COPY, e.name)
    )
    gap_us, gaps = defaultdict(float), defaultdict(int)
    busy_until = None
    for start, end, name in kernels:
        if busy_until is not None and start - busy_until >= GAP_MIN_US:
            gap_us[name] += start - busy_until
            gaps[name] += 1
        busy_until = end if busy_until is None else max(busy_until, end)
    worst = sorted(gap_us.items(), key=lambda item: -item[1])[:top]
    return [[name[:120], round(us / 1e6 / steps, 6), round(gaps[name] / steps, 2)] for name, us in worst]


def table(result: dict) -> str:
    step = result["step_s"]
    lines = [
        f"# Where a step's time goes: {result['device']}",
        "",
        f"`{result['command']}` ({result['date']})",
        "",
        f"Step {step * 1e3:.1f} ms (wall clock, mean of the profiled steps); "
        f"{result['kernels_per_step']} kernels a step.",
        "",
        "| work | ms per step | share of the step |",
        "|---|---|---|",
    ]
    for name, seconds in result["buckets_s"].items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {100 * seconds / step:.0f}% |")
    if result["idle_s"] is not None:
        idle = result["idle_s"]
        lines.append(
            f"| GPU idle (waiting for the host, or for a copy) | {idle * 1e3:.1f} | {100 * idle / step:.0f}% |"
        )
    lines += ["", "| the host, meanwhile | ms per step | calls per step |", "|---|---|---|"]
    calls = result["host_calls_per_step"]
    lines += [f"| {name} | {s * 1e3:.1f} | {calls[name]} |" for name, s in result["host_s"].items()]
    if result["idle_s"] is not None:
        lines.append(
            f"\n(Of the waits for the GPU, one in the whole window of {result['steps']} steps is the profiler's "
            "own, at its end, inside the last optimizer step's range: see on_step.)"
        )
    if result.get("idle_before_s"):
        lines += ["", f"| the GPU idle before (gaps of {GAP_MIN_US} us or more) | ms per step | gaps per step |"]
        lines += ["|---|---|---|"]
        lines += [f"| `{name}` | {s * 1e3:.2f} | {n} |" for name, s, n in result["idle_before_s"]]
    lines += ["", "| costliest kernels | ms per step |", "|---|---|"]
    lines += [f"| `{name}` | {seconds * 1e3:.2f} |" for name, seconds in result["top_kernels_s"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
