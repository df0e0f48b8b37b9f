"""Probe (issue 12, benchmarks/NOTES.md): would the frozen matmuls in FP8 buy what the checkpointed
16 x 512 step lacks?

    python benchmarks/probe_fp8.py --tokens 8192 --json DIR/probe_fp8.json   # a GPU with FP8 (Hopper, Ada)
    python benchmarks/probe_fp8.py --loop --out DIR [--variants bf16,fp8,...] [bench_loop.py options]

(tests/test_benchmarks.py checks its arithmetic on a CPU, at small shapes: torch._scaled_mm runs
there too, but slowly.)

With checkpointing every frozen weight takes part in three products a step (forward, recompute,
input gradient), all in bf16 today: 252 ms of the 16 x 512 step at the rate matmul_peak.py measured,
and by the count in NOTES item 22 the step cannot reach 25,000 tokens/s with them. Hopper's FP8
matmuls have twice bf16's peak. For each of Phi-3-mini's four projections this times:

    bf16       X @ W^T and G @ W, as the loop runs them
    fp8        the same through torch._scaled_mm: X and W in e4m3, G in e5m2 (a gradient needs the
               range), each with one scale for the tensor (its largest magnitude over the format's
               largest, computed on the device), the output in bf16
    casts      what fp8 adds: X's cast before each forward, G's before the input gradient (compiled:
               one reduction and one fused cast each), and W's cast and transposed copy once per
               dequantization

and the error of each form against an fp32 product, relative (Frobenius norms). Random data: real
activations have outlier features, for which one scale per tensor loses more precision. A
checkpointed step, per layer: two forwards (the forward and the recompute), one input gradient, and
W's cast twice (--reuse-dequant: the backward reuses the recompute's).

--loop runs bench_loop.py once for each of `--variants` (default bf16,fp8), each in its own
process and with --reuse-dequant on: bf16 is --fp8-matmuls off; fp8 is --fp8-matmuls on
(dequant.py's MatmulDequantizedOnceFP8: X and G scaled per token); fp8-tensorwise is the option as
NOTES items 28-29 measured it (one scale a tensor, W's from an amax pass), put in dequant.py's place
in its own process only. These three keep torch's dropout (--seeded-dropout off, whose auto would
turn it on in the fast path); bf16-seeded and fp8-seeded are bf16 and fp8 with --seeded-dropout on,
and fp8-seeded is what the defaults settle on with a Hopper GPU. (Two more variants were measured
at 1cb1450, NOTES item 30: W's scale from its block scales, now the option's, and W dequantized in
torch ops, which lost.) It writes every measurement to DIR/loop.jsonl and prints tokens/s, peak
memory and each variant's largest relative difference of a step's loss from the
first variant's, against the learning check's 1%.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # yoda_raw and benchmarks/

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402

from benchmarks import common, report  # noqa: E402
from benchmarks.matmul_peak import PHI3_LINEARS, time_ms  # noqa: E402
from yoda_raw.fast.dequant import E4M3  # noqa: E402

E5M2 = torch.float8_e5m2
LAYERS = 32


def to_fp8(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor / scale in `dtype`, scale): one scale for the whole tensor, its largest magnitude
    onto the format's largest (the tensor-wise form: --fp8-matmuls on as NOTES items 28-29 measured
    it; the option now scales X and G per token)."""
    amax = tensor.abs().amax().float().clamp(min=1e-12)
    scale = amax / torch.finfo(dtype).max
    return (tensor.float() / scale).to(dtype), scale


def fp8_product(a8, a_scale, b8_t, b_scale, out_dtype) -> torch.Tensor:
    """(a8 * a_scale) @ (b8_t * b_scale).T, one scale each: torch._scaled_mm's tensor-wise form."""
    return torch._scaled_mm(a8, b8_t.t(), scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype)


def fp8_forward(x8, x_scale, w8, w_scale) -> torch.Tensor:
    """X @ W^T, the tensor-wise form of the forward product."""
    return fp8_product(x8, x_scale, w8, w_scale, torch.bfloat16)


def fp8_input_gradient(g8, g_scale, w8_transposed, w_scale) -> torch.Tensor:
    """G @ W, with W held as a row-major copy of W^T: the tensor-wise form of the input gradient."""
    return fp8_product(g8, g_scale, w8_transposed, w_scale, torch.bfloat16)


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.float() - reference).norm() / reference.norm()).item()


def errors(x, w, g) -> dict:
    """Each form's error against fp32, for the forward and the input gradient."""
    x32, w32, g32 = x.float(), w.float(), g.float()
    (x8, xs), (w8, ws), (g8, gs) = to_fp8(x, E4M3), to_fp8(w, E4M3), to_fp8(g, E5M2)
    return {
        "bf16_forward": relative_error(x @ w.T, x32 @ w32.T),
        "bf16_input_gradient": relative_error(g @ w, g32 @ w32),
        "fp8_forward": relative_error(fp8_forward(x8, xs, w8, ws), x32 @ w32.T),
        "fp8_input_gradient": relative_error(fp8_input_gradient(g8, gs, w8.t().contiguous(), ws), g32 @ w32),
    }


def inputs(tokens: int, k: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations, a frozen weight (scaled as an initialised one) and an output gradient, in bf16."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=torch.bfloat16)

    return randn(tokens, k), randn(n, k, scale=k**-0.5), randn(tokens, n)


def timings(x, w, g, repeats: int) -> dict:
    (x8, xs), (w8, ws), (g8, gs) = to_fp8(x, E4M3), to_fp8(w, E4M3), to_fp8(g, E5M2)
    w8_transposed = w8.t().contiguous()
    cast = torch.compile(to_fp8, dynamic=False)  # one reduction and one fused cast, as a real path would
    return {
        "bf16_forward_ms": time_ms(lambda: x @ w.T, repeats),
        "bf16_input_gradient_ms": time_ms(lambda: g @ w, repeats),
        "fp8_forward_ms": time_ms(lambda: fp8_forward(x8, xs, w8, ws), repeats),
        "fp8_input_gradient_ms": time_ms(lambda: fp8_input_gradient(g8, gs, w8_transposed, ws), repeats),
        "cast_x_ms": time_ms(lambda: cast(x, E4M3), repeats),
        "cast_g_ms": time_ms(lambda: cast(g, E5M2), repeats),
        "cast_w_ms": time_ms(lambda: cast(w, E4M3)[0].t().contiguous(), repeats),
    }


def step_ms(t: dict) -> dict:
    """One layer's share of a checkpointed step, times the layers: bf16 as today, fp8 with its casts."""
    bf16 = 2 * t["bf16_forward_ms"] + t["bf16_input_gradient_ms"]
    fp8 = 2 * (t["fp8_forward_ms"] + t["cast_x_ms"]) + t["fp8_input_gradient_ms"] + t["cast_g_ms"]
    return {"bf16": LAYERS * bf16, "fp8": LAYERS * (fp8 + 2 * t["cast_w_ms"])}


class MatmulDequantizedOnceFP8Tensorwise(torch.autograd.Function):
    """--fp8-matmuls on as it was measured in NOTES items 28-29: one scale a tensor (X and W in e4m3,
    G in e5m2), W's from an amax pass over the dequantized weight. The variant the option's
    one-scale-a-token form is measured against."""

    @staticmethod
    def forward(ctx, x, packed_weight, quant_state):
        w8, w_scale = to_fp8(bnb.functional.dequantize_4bit(packed_weight, quant_state), E4M3)
        x8, x_scale = to_fp8(x.reshape(-1, x.shape[-1]), E4M3)
        ctx.save_for_backward(w8, w_scale)
        return fp8_product(x8, x_scale, w8, w_scale, x.dtype).reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        w8, w_scale = ctx.saved_tensors
        g8, g_scale = to_fp8(grad_output.reshape(-1, grad_output.shape[-1]), E5M2)
        grad = fp8_product(g8, g_scale, w8.t().contiguous(), w_scale, grad_output.dtype)
        return grad.reshape(*grad_output.shape[:-1], -1), None, None


VARIANTS = {
    "bf16": (["--fp8-matmuls", "off", "--seeded-dropout", "off"], None),
    "fp8": (["--fp8-matmuls", "on", "--seeded-dropout", "off"], None),
    "fp8-tensorwise": (["--fp8-matmuls", "on", "--seeded-dropout", "off"], MatmulDequantizedOnceFP8Tensorwise),
    "fp8-seeded": (["--fp8-matmuls", "on", "--seeded-dropout", "on"], None),
    "bf16-seeded": (["--fp8-matmuls", "off", "--seeded-dropout", "on"], None),
}


def loop(out: Path, options: list[str], variants: list[str]) -> int:
    """bench_loop.py once for each variant, each in its own process; every variant's losses
    compared with the first's. A variant that fails is reported and the others still run (one
    device call measures them all); the exit status is then 1."""
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []
    for variant in variants:
        command = [sys.executable, __file__, "--loop-child", variant, *options, "--reuse-dequant", "on"]
        command += [*VARIANTS[variant][0], "--json", str(out / "loop.jsonl"), "--name", variant]
        with open(out / f"loop_{variant}.log", "w") as log_file:
            status = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT).returncode
        if status == 0:
            results[variant] = json.loads((out / "loop.jsonl").read_text().splitlines()[-1])
        else:
            log = out / f"loop_{variant}.log"
            failed.append(f"{variant}: the run failed (exit status {status}); its output is in {log}")
    first = next(iter(results), None)
    for variant, r in results.items():
        line = f"{variant}: {r['tokens_per_s']:.0f} tokens/s, {r['peak_allocated_gib']} GiB peak allocated"
        if variant != first:
            worst = report.worst_relative_difference(r["losses"], results[first]["losses"])
            line += (
                f"; losses at most {worst:.4%} from {first}'s over {len(r['losses'])} steps (the learning check: 1%)"
            )
        print(line)
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0


def loop_child(variant: str, options: list[str]) -> int:
    """One variant's bench_loop.py run, in this process."""
    from benchmarks import bench_loop
    from yoda_raw.fast import dequant

    matmul = VARIANTS[variant][1]
    if matmul is not None:
        dequant.MatmulDequantizedOnceFP8 = matmul  # what reuse_dequantized_weights gives each linear
    return bench_loop.main(options)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="probe_fp8.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--tokens", type=int, default=8192, help="Rows of the activations (16 x 512 = 8192).")
    parser.add_argument("--repeats", type=int, default=50, help="Timed repetitions of each.")
    parser.add_argument("--json", help="Write the figures here.")
    parser.add_argument("--loop", action="store_true", help="Run the loop both ways (bench_loop.py options follow).")
    parser.add_argument("--out", help="With --loop: the folder for loop.jsonl and the runs' logs.")
    parser.add_argument(
        "--variants",
        default="bf16,fp8",
        help=f"With --loop: which, in order; losses compared with the first's (of {', '.join(VARIANTS)}).",
    )
    parser.add_argument("--loop-child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args, options = parser.parse_known_args(argv)
    if args.loop_child:
        return loop_child(args.loop_child, [*options, "--json", args.json] if args.json else options)
    if args.loop:
        variants = args.variants.split(",")
        unknown = [v for v in variants if v not in VARIANTS]
        if not args.out or unknown or len(variants) < 2:
            common.fail(f"--loop needs --out DIR and two or more --variants of {', '.join(VARIANTS)}")
        return loop(Path(args.out), options, variants)
    if options:
        common.fail(f"unknown options {' '.join(options)} (bench_loop.py's options go with --loop)")
    if not torch.cuda.is_available():
        common.fail("probe_fp8.py times on a CUDA GPU with FP8 matmuls (Hopper, Ada)")
    # The compiled cast meets 12 shapes and formats: past dynamo's default of 8 recompiles it would run
    # eager from then on, and its timings would be eager ones.
    torch._dynamo.config.recompile_limit = 64
    result = {"device": common.device_name(), "versions": common.versions(), "date": common.now_utc()}
    result |= {"command": "python benchmarks/probe_fp8.py " + " ".join(argv), "tokens": args.tokens, "linears": {}}
    totals = {"bf16": 0.0, "fp8": 0.0}
    for name, k, n in PHI3_LINEARS:
        x, w, g = inputs(args.tokens, k, n, "cuda")
        figures = errors(x, w, g) | timings(x, w, g, args.repeats)
        for form, ms in step_ms(figures).items():
            totals[form] += ms
        result["linears"][name] = figures
        print(name, json.dumps({key: round(value, 4) for key, value in figures.items()}))
    result["step_ms"] = totals
    print(f"a checkpointed step's frozen products, {LAYERS} layers: bf16 {totals['bf16']:.1f} ms, "
          f"fp8 with its casts {totals['fp8']:.1f} ms")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
