"""What is alive at the peak of allocated memory, read from a torch memory snapshot.

    python benchmarks/bench_loop.py --batch-size 16 --max-length 512 --warmup 1 --steps 2 \\
        --snapshot /tmp/s.pickle --snapshot-entries 300000             # on a CUDA GPU
    python benchmarks/lab/peak_tensors.py /tmp/s.pickle [--top 25]     # anywhere

The snapshot (`torch.cuda.memory._record_memory_history`) keeps the allocator's events: each block
allocated and freed, with the Python stack that allocated it. This replays them in order, keeping
the blocks alive, finds the moment the most bytes were allocated, and groups the blocks alive then
by where they were allocated: the innermost frame outside torch's own code (a line of yoda_raw,
transformers, peft or bitsandbytes), or torch's if there is none. A CUDA graph allocates only while
it is captured (its replays reuse the same memory), so in a run with the graph the capture is what
this sees. Blocks allocated before the recording began (or before its window of --snapshot-entries
events) are not seen: the weights, and in a short window more; the table says how much that is.
"""

import argparse
import pickle
import sys
from collections import defaultdict

MIB = 2**20
TORCH_INTERNALS = ("/torch/", "<frozen", "/contextlib.py", "/functools.py")


def replay(events: list[dict]) -> tuple[int, dict, int]:
    """(peak bytes above the window's start, the blocks alive then {addr: event}, bytes freed that the
    window never saw allocated). A block counts from its `alloc` to its `free_completed` (its memory
    is reusable from then; `free_requested` comes first when another stream still uses it)."""

    def run(until: int):
        alive, allocated, peak, peak_at, unseen = {}, 0, 0, -1, 0
        for i, event in enumerate(events[:until]):
            if event["action"] == "alloc":
                alive[event["addr"]] = event
                allocated += event["size"]
                if allocated > peak:
                    peak, peak_at = allocated, i
            elif event["action"] == "free_completed":
                if alive.pop(event["addr"], None) is None:
                    unseen += event["size"]  # allocated before the window began
                else:
                    allocated -= event["size"]
        return alive, peak, peak_at, unseen

    _, peak, peak_at, unseen = run(len(events))  # where the peak is
    alive, _, _, _ = run(peak_at + 1)  # what is alive there
    return peak, alive, unseen


def where(event: dict) -> str:
    """Where a block was allocated: the innermost frame outside torch's internals, `file:line name`."""
    frames = event.get("frames") or []
    chosen = next((f for f in frames if not any(part in f["filename"] for part in TORCH_INTERNALS)), None)
    chosen = chosen or (frames[0] if frames else None)
    if chosen is None:
        return "(no stack recorded)"
    path = chosen["filename"]
    for root in ("yoda_raw/", "transformers/", "peft/", "bitsandbytes/", "torch/"):
        if root in path:
            path = root + path.split(root, 1)[1]
            break
    return f"{path}:{chosen['line']} {chosen['name']}"


def grouped(blocks: dict) -> list[tuple[str, int, int]]:
    """(where, bytes, blocks) for each allocating place, largest first."""
    sizes: dict = defaultdict(lambda: [0, 0])
    for event in blocks.values():
        sizes[where(event)][0] += event["size"]
        sizes[where(event)][1] += 1
    return sorted(((place, n, count) for place, (n, count) in sizes.items()), key=lambda row: -row[1])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", help="A pickle from torch.cuda.memory._dump_snapshot (bench_loop.py --snapshot).")
    parser.add_argument("--top", type=int, default=25, help="Places to list (default 25).")
    parser.add_argument("--device", type=int, default=0, help="Which device's events (default 0).")
    parser.add_argument(
        "--blocks",
        type=int,
        default=0,
        help="Also list the largest blocks alive at the peak, in the order they were allocated: what a snapshot "
        "recorded without stacks (bench_loop.py --snapshot-stacks none) still says.",
    )
    args = parser.parse_args(argv)
    with open(args.snapshot, "rb") as f:
        snapshot = pickle.load(f)
    traces = snapshot.get("device_traces") or []
    if args.device >= len(traces) or not traces[args.device]:
        print(f"error: {args.snapshot} holds no allocation events for device {args.device}", file=sys.stderr)
        return 2
    peak, alive, unseen = replay(traces[args.device])
    print(
        f"{len(traces[args.device])} events; peak {peak / MIB:,.1f} MiB above the recording's start, "
        f"{len(alive)} blocks alive then; {unseen / MIB:,.1f} MiB freed that was allocated before it"
    )
    print(f"{'MiB':>10} {'blocks':>7}  allocated at")
    rows = grouped(alive)
    for place, size, count in rows[: args.top]:
        print(f"{size / MIB:>10,.1f} {count:>7}  {place}")
    rest = sum(size for _, size, _ in rows[args.top :])
    if rest:
        print(f"{rest / MIB:>10,.1f} {'':>7}  ({len(rows) - args.top} more places)")
    if args.blocks:
        events = traces[args.device]
        order = {id(event): i for i, event in enumerate(events)}
        largest = sorted(alive.values(), key=lambda event: -event["size"])[: args.blocks]
        print(f"\nthe {len(largest)} largest blocks alive at the peak, by allocation (event of {len(events)}):")
        for event in sorted(largest, key=lambda event: order[id(event)]):
            print(f"{event['size'] / MIB:>10,.1f} MiB  event {order[id(event)]:>7}  {where(event)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
