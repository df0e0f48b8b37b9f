"""How near the memory's bandwidth the compiled layer's element-wise kernels run, from inductor's own log.

    TORCHINDUCTOR_PROFILE=1 TORCH_LOGS=inductor python benchmarks/bench_loop.py --batch-size 16 \\
        --max-length 512 --cuda-graph off --compile-layers on --warmup 1 --steps 1 ... 2>&1 \\
        | grep -E "GB/s" > bandwidth.txt
    python benchmarks/lab/bandwidth_table.py bandwidth.txt --layers 32 --peak-tb-s 4.8 > bandwidth.md

With TORCHINDUCTOR_PROFILE=1, inductor times each Triton kernel it wrote the first time it runs
(Triton's do_bench) and logs its time, the bytes of its arguments and their ratio. After that first
timing it skips the kernel, so that run's losses mean nothing and it must not run inside a CUDA
graph. Every decoder layer runs the same compiled code, so the log holds one layer's forward
kernels, then its backward kernels (each graph's kernels are numbered from 0).

The table: every kernel, the forward and backward sums, and what a step needs: the layers times
(forward passes x the forward sum + the backward sum), two forward passes with gradient
checkpointing (the recompute). "At the peak" is those bytes at --peak-tb-s. The bytes are
inductor's count, the sizes of all the kernel's tensor arguments: a kernel that reads part of a
tensor is counted for the whole of it, so a count can exceed the true traffic (a rate above the
peak shows it).
"""

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: yoda_raw and benchmarks/

from benchmarks import common  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;]*m")
KERNEL = re.compile(r"([\d.]+)ms\s+([\d.]+) GB\s+([\d.]+)GB/s\s+(triton_\w+?)_(\d+)$")


def read_kernels(text: str) -> list[dict]:
    """One record per timed kernel, in the order run, each marked forward or backward: the second
    graph starts where a kernel's number goes back down."""
    kernels, graph, last = [], "forward", -1
    for line in ANSI.sub("", text).splitlines():
        match = KERNEL.search(line.strip())
        if not match:
            continue  # a graph's total line, or another log line
        ms, gb, gb_s, name, number = match.groups()
        if int(number) <= last:
            if graph == "backward":
                common.fail("the log holds more than two graphs; profile one compiled layer's step")
            graph = "backward"
        last = int(number)
        kernels.append({"graph": graph, "name": f"{name}_{number}", "ms": float(ms), "gb": float(gb)})
    if not kernels:
        common.fail("no kernel timings in the log: run with TORCHINDUCTOR_PROFILE=1 TORCH_LOGS=inductor")
    return kernels


def step_figures(kernels: list[dict], layers: int, forward_passes: int, peak_tb_s: float) -> dict:
    """Sums per graph and for a whole step: ms, GB, and the ms those GB take at the peak."""
    sums = {
        graph: {
            "ms": sum(k["ms"] for k in kernels if k["graph"] == graph),
            "gb": sum(k["gb"] for k in kernels if k["graph"] == graph),
        }
        for graph in ("forward", "backward")
    }
    step_ms = layers * (forward_passes * sums["forward"]["ms"] + sums["backward"]["ms"])
    step_gb = layers * (forward_passes * sums["forward"]["gb"] + sums["backward"]["gb"])
    return {
        **sums,
        "step_ms": step_ms,
        "step_gb": step_gb,
        "step_tb_s": step_gb / step_ms,  # GB/ms = TB/s
        "step_ms_at_peak": step_gb / peak_tb_s,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bandwidth_table.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("log", help="The profiled run's log lines with GB/s in them.")
    parser.add_argument("--layers", type=int, default=32, help="Decoder layers (Phi-3-mini: 32).")
    parser.add_argument(
        "--forward-passes", type=int, default=2, help="Forward passes a step (2 with checkpointing, else 1)."
    )
    parser.add_argument("--peak-tb-s", type=float, required=True, help="The memory's peak TB/s (H200: 4.8).")
    args = parser.parse_args(argv)
    kernels = read_kernels(Path(args.log).read_text())
    f = step_figures(kernels, args.layers, args.forward_passes, args.peak_tb_s)
    lines = ["| graph | kernel | ms | GB | TB/s |", "|---|---|---|---|---|"]
    lines += [
        f"| {k['graph']} | `{k['name']}` | {k['ms']:.3f} | {k['gb']:.3f} | {k['gb'] / k['ms']:.2f} |" for k in kernels
    ]
    for graph in ("forward", "backward"):
        g = f[graph]
        lines.append(f"| **{graph}, all** | | {g['ms']:.3f} | {g['gb']:.3f} | {g['gb'] / g['ms']:.2f} |")
    lines += [
        "",
        f"A step: {args.layers} layers x ({args.forward_passes} x forward + backward) = {f['step_ms']:.1f} ms "
        f"and {f['step_gb']:.0f} GB, {f['step_tb_s']:.2f} TB/s on average; those bytes at {args.peak_tb_s} TB/s "
        f"take {f['step_ms_at_peak']:.1f} ms.",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
