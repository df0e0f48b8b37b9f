"""What bf16 matrix work sustains on this GPU, at the shapes of Phi-3-mini's frozen layers.

    python benchmarks/lab/matmul_peak.py --tokens 8192 --json DIR/matmul_peak.json

The 16 x 512 step's floor is an argument about matmuls: with gradient checkpointing a token costs
three passes over the frozen weights (forward, recompute, input gradient). Its time at best is that
arithmetic divided by the rate the GPU sustains on these very shapes, measured here rather than
taken from a datasheet. For each of the four projections (qkv, o, gate_up, down) it times the
forward product X @ W.T and the input gradient G @ W (both bf16, fp32 accumulate: what F.linear
and its backward run), each as a CUDA-event-timed loop after a warm-up, and prints TFLOP/s for each
and for the sum weighted as a decoder layer runs them.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: yoda_raw and benchmarks/

import torch  # noqa: E402

from benchmarks import common  # noqa: E402

# Phi-3-mini's projections: (name, in_features, out_features).
PHI3_LINEARS = [
    ("qkv_proj", 3072, 9216),
    ("o_proj", 3072, 3072),
    ("gate_up_proj", 3072, 16384),
    ("down_proj", 8192, 3072),
]


def time_ms(fn, repeats: int) -> float:
    """Mean milliseconds of fn() over `repeats` calls, timed by CUDA events, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="Rows of the activations (16 x 512 = 8192).")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None, help="Write the figures here.")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        common.fail("matmul_peak.py needs a CUDA GPU")
    torch.manual_seed(0)
    rows, total_flop, total_ms = [], 0.0, 0.0
    for name, k, n in PHI3_LINEARS:
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16)
        flop = 2.0 * args.tokens * k * n
        for kind, a, b in (("forward X @ W.T", x, w.T), ("input gradient G @ W", g, w)):
            ms = time_ms(lambda a=a, b=b: a @ b, args.repeats)
            rows.append({"linear": name, "product": kind, "ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1)})
            total_flop, total_ms = total_flop + flop, total_ms + ms
            print(f"{name:13s} {kind:22s} {ms:7.3f} ms {flop / ms / 1e9:7.1f} TFLOP/s")
    overall = total_flop / total_ms / 1e9
    print(f"all eight products of a decoder layer: {overall:.1f} TFLOP/s at {args.tokens} tokens")
    if args.json:
        result = {"tokens": args.tokens, "tflops_overall": round(overall, 1), "products": rows,
                  "gpu": common.device_name(), **common.versions(), "date": common.now_utc()}  # fmt: skip
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
