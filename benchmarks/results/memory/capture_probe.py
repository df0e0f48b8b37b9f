"""One run.py under a 6 GiB cap (torch's per-process fraction, as test_gpu.py's --auto-batch-size
test sets it), with the CUDA graph and offloading and no retry: what is allocated and reserved just
before the graph's capture, after torch.cuda.graph empties the cache, and, if the capture runs out
of memory, torch's own message (which --auto-batch-size's retry hides). Run by call21.sh:
    python benchmarks/results/memory/capture_probe.py ROWS OUTPUT_DIR run.py's options...
"""

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]  # the repository: run.py and yoda_raw
sys.path.insert(0, str(ROOT))
GIB = 2**30


def main(rows: str, out: str, options: list[str]) -> int:
    torch.cuda.set_per_process_memory_fraction(6 * GIB / torch.cuda.get_device_properties(0).total_memory)
    from yoda_raw.fast.graphs import GraphStep

    capture = GraphStep._capture

    def probed(self):
        torch.cuda.synchronize()
        line = f"rows {rows}: before the capture allocated {torch.cuda.memory_allocated() / GIB:.3f} GiB"
        line += f", reserved {torch.cuda.memory_reserved() / GIB:.3f}"
        line += f", peak so far {torch.cuda.max_memory_allocated() / GIB:.3f}"
        torch.cuda.empty_cache()  # what torch.cuda.graph does on entering
        print(f"{line}; after emptying the cache reserved {torch.cuda.memory_reserved() / GIB:.3f}", flush=True)
        try:
            capture(self)
        except torch.OutOfMemoryError as err:
            print(f"rows {rows}: the capture ran out of memory: {' '.join(str(err).split())[:600]}", flush=True)
            print(torch.cuda.memory_summary(abbreviated=True), flush=True)
            raise
        print(f"rows {rows}: captured; reserved {torch.cuda.memory_reserved() / GIB:.3f} GiB", flush=True)

    GraphStep._capture = probed
    spec = importlib.util.spec_from_file_location("run", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--batch-size", rows, "--no-auto-batch-size", "--output-dir", out, "--overwrite", *options]
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
