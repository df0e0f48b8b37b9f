"""One run.py under a 6 GiB cap (torch's per-process fraction, as test_gpu.py's --auto-batch-size
test sets it), with no retry: what is allocated and reserved just before the CUDA graph's capture,
after torch.cuda.graph empties the cache, and, if the capture runs out of memory, torch's own
message (which --auto-batch-size's retry hides). With --after-a-run, a run of 16 x 64 for 3 steps
with the same options goes first in the same process (as test_gpu.py's earlier tests do), and what
it leaves allocated once collected is printed. Run by next_probe.sh:
    python benchmarks/results/memory/capture_probe.py ROWS OUTPUT_DIR [--after-a-run] run.py's options...
"""

import gc
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]  # the repository: run.py and yoda_raw
sys.path.insert(0, str(ROOT))
GIB = 2**30


def memory() -> str:
    return f"allocated {torch.cuda.memory_allocated() / GIB:.3f} GiB, reserved {torch.cuda.memory_reserved() / GIB:.3f}"


def main(rows: str, out: str, options: list[str]) -> int:
    from benchmarks.bench_loop import release
    from yoda_raw.fast.graphs import GraphStep

    capture = GraphStep._capture

    def probed(self):
        torch.cuda.synchronize()
        line = f"rows {rows}: before the capture {memory()}, peak so far {torch.cuda.max_memory_allocated() / GIB:.3f}"
        torch.cuda.empty_cache()  # what torch.cuda.graph does on entering
        print(f"{line}; after emptying the cache reserved {torch.cuda.memory_reserved() / GIB:.3f}", flush=True)
        try:
            capture(self)
        except torch.OutOfMemoryError as err:
            print(f"rows {rows}: the capture ran out of memory: {' '.join(str(err).split())[:600]}", flush=True)
            print(torch.cuda.memory_summary(abbreviated=True), flush=True)
            raise
        print(f"rows {rows}: captured; {memory()}", flush=True)

    GraphStep._capture = probed
    spec = importlib.util.spec_from_file_location("run", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if options[:1] == ["--after-a-run"]:
        options = options[1:]
        first = ["--batch-size", "16", "--max-length", "64", "--max-steps", "3", "--output-dir", out + "-first"]
        code = module.main([*options, *first, "--no-auto-batch-size", "--overwrite"])
        release()  # what bench_loop.py does between runs in one process
        print(f"rows {rows}: after a first run (exit {code}) and collecting: {memory()}", flush=True)
        left = [o for o in gc.get_objects() if torch.is_tensor(o) and o.device.type == "cuda"]
        left.sort(key=lambda t: -t.untyped_storage().nbytes())
        for t in left[:12]:  # what still holds it: the largest CUDA tensors Python can reach
            print(
                f"rows {rows}: left {t.untyped_storage().nbytes() / 2**20:.1f} MiB {t.dtype} {tuple(t.shape)}",
                flush=True,
            )
        print(f"rows {rows}: {len(left)} CUDA tensors reachable", flush=True)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(6 * GIB / torch.cuda.get_device_properties(0).total_memory)
    argv = [*options, "--max-length", "512", "--batch-size", rows, "--no-auto-batch-size", "--output-dir", out]
    return module.main([*argv, "--overwrite"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
