"""What each of the GPU's idle gaps waited for, read from a profile's trace.

    python benchmarks/profile_step.py --out /tmp/p --name levers ... --offload-activations on ...
    python benchmarks/lab/gap_waits.py /tmp/p/levers_trace.json --steps 3 > gaps.md

profile_step.py's table lists the kernels the GPU waited longest to start; this says what it was
waiting for. Every gap of at least --gap-us in the GPU's work is put down to one cause. The work is
every kernel, on any stream (with the CUDA graph, a replay's kernels run on streams of their own
beside the default stream's), and every copy and fill on the GPU; copies to and from host memory
are not work but what the GPU may wait for, as in profile_step.py's idle time:

- the host, where the next kernel's launch (its runtime call, by correlation id) ended inside the
  gap: the kernel could not start sooner. It is named by the op that launched it (the innermost
  `cpu_op` around the runtime call; a CUDA graph's kernels all have the graph's launch, before it),
  and by what held the host up through at least half the gap: a runtime call of the launching
  thread (a synchronize, a graph launch, a pinned allocation), with the op around it; else the
  innermost op of that thread that did (Python work, such as collating the next batch).
- else a copy to or from host memory that ended inside the gap: the GPU waited for it (with
  --offload-activations, a layer input going to host memory or coming back). The copy is named by
  its direction and size, so a reader can tell which tensor it was.
- else "not known": a wait on something the trace does not show.

The trace is the Chrome trace torch's profiler writes (`export_chrome_trace`, also gzipped): GPU
events of category `kernel`, `gpu_memcpy` and `gpu_memset` with their stream and correlation id,
runtime calls (`cuda_runtime`, `cuda_driver`) with the same ids, and `cpu_op` ranges.
"""

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: yoda_raw and benchmarks/

from benchmarks import common  # noqa: E402

GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")
SETTLE_US = 10.0  # a wait ends this long after what it waited for, at most (the event's and the launch's latency)


def read_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            trace = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as err:
        common.fail(f"{path}: not a readable trace ({err}); give profile_step.py's NAME_trace.json, whole")
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "ts" in e]


def gap_causes(events: list[dict], gap_us: float) -> list[dict]:
    """Every gap of at least `gap_us` in the GPU's work, as {"us", "cause"}."""
    gpu = [e for e in events if e.get("cat") in GPU_WORK]
    if not gpu:
        common.fail("the trace has no GPU events: profile on a CUDA GPU (profile_step.py's trace)")
    work = sorted((e for e in gpu if not re.search(common.HOST_COPY, e["name"])), key=lambda e: e["ts"])
    copies = [e for e in gpu if re.search(common.HOST_COPY, e["name"])]
    runtime = [e for e in events if e.get("cat") in LAUNCHES]
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    ops = [e for e in events if e.get("cat") == "cpu_op"]

    gaps, busy_until = [], None
    for e in work:
        if busy_until is not None and e["ts"] - busy_until >= gap_us:
            start, end = busy_until, e["ts"]
            gaps.append({"us": end - start, "cause": cause(start, end, e, copies, launches, runtime, ops)})
        busy_until = e["ts"] + e["dur"] if busy_until is None else max(busy_until, e["ts"] + e["dur"])
    return gaps


def cause(
    start, end, next_event: dict, copies: list[dict], launches: dict, runtime: list[dict], ops: list[dict]
) -> str:
    """What the gap [start, end) before `next_event` waited for (see the module docstring)."""
    launch = launches.get(next_event.get("args", {}).get("correlation"))
    if launch is not None and start < launch["ts"] + launch["dur"] <= end + SETTLE_US:
        # What held the host through most of the gap: a runtime call (a synchronize, a graph
        # launch), else the innermost op it was in (Python work, collating a batch, shows so).
        most = (end - start) / 2
        thread = launch.get("tid")
        held = [e for e in runtime if e is not launch and e.get("tid") == thread and overlap(e, start, end) >= most]
        if held:
            blocker = max(held, key=lambda e: overlap(e, start, end))
            return f"the host: {launching_op(launch, ops)}, after {blocker['name']} in {launching_op(blocker, ops)}"
        busy = [op for op in ops if op.get("tid") == thread and overlap(op, start, end) >= most]
        if busy:
            return f"the host: {launching_op(launch, ops)}, while in {min(busy, key=lambda op: op['dur'])['name']}"
        return f"the host: {launching_op(launch, ops)}"
    ended = [e for e in copies if start < e["ts"] + e["dur"] <= end + SETTLE_US]
    if ended:
        copy = max(ended, key=lambda e: e["ts"] + e["dur"])  # the last to end: what the wait was for
        return f"{copy['name']}, {copy.get('args', {}).get('bytes', 0) / 2**20:.1f} MiB"
    return "not known"


def overlap(event: dict, start: float, end: float) -> float:
    return min(event["ts"] + event["dur"], end) - max(event["ts"], start)


def launching_op(launch: dict, ops: list[dict]) -> str:
    """The innermost cpu_op of the launch's thread around the launch, else the launch's own name."""
    around = [
        op
        for op in ops
        if op.get("tid") == launch.get("tid")
        and op["ts"] <= launch["ts"]
        and launch["ts"] + launch["dur"] <= op["ts"] + op["dur"]
    ]
    return min(around, key=lambda op: op["dur"])["name"] if around else launch["name"]


def table(gaps: list[dict], steps: int, gap_us: float, top: int) -> str:
    by_cause = defaultdict(lambda: [0.0, 0])
    for gap in gaps:
        by_cause[gap["cause"]][0] += gap["us"]
        by_cause[gap["cause"]][1] += 1
    total = sum(us for us, _ in by_cause.values())
    lines = [
        f"Gaps of {gap_us:g} us or more in the GPU's work: {total / 1e3 / steps:.2f} ms a step, "
        f"{len(gaps) / steps:.2f} gaps a step.",
        "",
        "| waited for | ms per step | gaps per step |",
        "|---|---|---|",
    ]
    for name, (us, n) in sorted(by_cause.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"| {name[:110]} | {us / 1e3 / steps:.2f} | {n / steps:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="profile_step.py's NAME_trace.json (or .json.gz)")
    parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (profile_step.py's --steps)")
    parser.add_argument("--gap-us", type=float, default=20.0, help="the shortest gap counted")
    parser.add_argument("--top", type=int, default=15, help="causes listed")
    args = parser.parse_args(argv)
    if not args.trace.is_file():
        common.fail(f"no trace at {args.trace}: give profile_step.py's NAME_trace.json")
    print(table(gap_causes(read_trace(args.trace), args.gap_us), args.steps, args.gap_us, args.top), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
