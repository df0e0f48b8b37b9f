"""The least memory traffic a checkpointed step of this design must move, and the step it bounds.

    python benchmarks/lab/least_traffic.py --tokens 8192 --matmul-ms 272.1 --attention-ms 17.4 --peak-tb-s 4.8

A count by hand, not a measurement (benchmarks/NOTES.md, item 22). The design: cuBLAS for the frozen
products, peft's LoRA products as matmuls of their own, element-wise kernels between them, every
layer checkpointed (two forwards a step: the forward and the recompute). Each row is a layer's
memory-bound work in elements a token (bf16, 2 bytes; dropout masks 1 byte), with every possible
fusion made and nothing written twice. With the matmuls and attention as profiled (their ms given
here), the two 4-bit dequantizations at the peak bandwidth and the element-wise rows at the peak
too, no idle time: the shortest step, and the tokens/s it allows. And for --target tokens/s: the
rate the frozen matmuls would need, with LoRA's own matmuls at the peak bandwidth as well.

--fp8 (--fp8-matmuls on; NOTES item 29) adds what the casts into FP8 must move at the least: each
frozen product's input cast in both forwards and its output gradient once (read in bf16, written in
e4m3: 3 bytes an element; each amax fused into the kernel that makes the tensor), and each weight
cast twice (3 bytes) with one transposed copy for the backward (2 bytes; its amax from the 4-bit
block scales).

    python benchmarks/lab/least_traffic.py --tokens 8192 --matmul-ms 162.2 --attention-ms 16.4 --peak-tb-s 4.8 --fp8
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: yoda_raw and benchmarks/

from benchmarks.lab.matmul_peak import PHI3_LINEARS  # noqa: E402

LAYERS, BYTES = 32, 2
HIDDEN, QKV, INTERMEDIATE = 3072, 9216, 8192  # Phi-3-mini: d, the qkv projection's outputs, f
VOCAB = 32064


def rows(d: int = HIDDEN, qkv: int = QKV, f: int = INTERMEDIATE) -> list[tuple[str, float, float, bool]]:
    """(work, elements a token in each forward, in the backward, LoRA's matmul or not)."""
    lora_inputs = 3 * d + f  # the dropped inputs of qkv, o, gate_up (d each) and down (f)
    lora_outputs = qkv + d + 2 * f + d  # the products of qkv, o, gate_up, down
    return [
        ("norm 1 with LoRA's dropout: read x, write h and dropout(h)", 3 * d, 5.5 * d, False),
        ("qkv: add LoRA's product, rotary", 3 * qkv, 2 * qkv, False),
        ("LoRA's dropout of the attention output", 2 * d, 3.5 * d, False),
        ("o: add LoRA's product and the residual, norm 2 with dropout", 6 * d, 5.5 * d, False),
        ("gate_up: add LoRA's product, SwiGLU, dropout", 6 * f, 8.5 * f, False),
        ("down: add LoRA's product and the residual", 4 * d, 0, False),
        ("LoRA's matmuls: read the dropped inputs, write the products", lora_inputs + lora_outputs,
         2 * lora_outputs + 2 * lora_inputs, True),
    ]  # fmt: skip


def masks(d: int = HIDDEN, f: int = INTERMEDIATE) -> float:
    """Dropout masks (1 byte an element, in bf16 elements), written by the recompute only."""
    return 0.5 * (3 * d + f)


def elements_per_token(forward_passes: int = 2, lora: bool | None = None) -> float:
    """A layer's elements a token in a step: each forward row `forward_passes` times, the backward
    once, the masks once; `lora` True or False: only LoRA's matmuls, or only the rest."""
    chosen = [r for r in rows() if lora is None or r[3] == lora]
    total = sum(forward_passes * fwd + bwd for _, fwd, bwd, _ in chosen)
    return total + (masks() if lora is not True else 0)


def fp8_casts_gb(tokens: int, d: int = HIDDEN, qkv: int = QKV, f: int = INTERMEDIATE) -> float:
    """GB a step the casts into FP8 move at the least (--fp8): the inputs of the four frozen products
    in each of the two forwards and their output gradients once, 3 bytes an element; every decoder
    weight cast twice (3 bytes) and copied transposed once (2 bytes)."""
    inputs, gradients = 3 * d + f, qkv + d + 2 * f + d
    weights = sum(k * n for _, k, n in PHI3_LINEARS)
    return LAYERS * (tokens * (2 * inputs + gradients) * 3 + weights * (2 * 3 + 2)) / 1e9


def bound(tokens: int, matmul_ms: float, attention_ms: float, peak_tb_s: float, fp8: bool = False) -> dict:
    """The shortest step, with the element-wise work, the dequantizations (and with `fp8` the
    casts) at the peak."""

    def gb(elements: float) -> float:
        return elements * BYTES * tokens * LAYERS / 1e9

    decoder_params = LAYERS * sum(k * n for _, k, n in PHI3_LINEARS)
    dequant_gb = 2 * decoder_params * (0.5 + BYTES) / 1e9  # two a step: 4-bit read, bf16 written
    figures = {
        "all_gb": gb(elements_per_token()),
        "elementwise_gb": gb(elements_per_token(lora=False)),
        "lora_gb": gb(elements_per_token(lora=True)),
        "dequant_gb": dequant_gb,
        "casts_gb": fp8_casts_gb(tokens) if fp8 else 0.0,
    }
    figures |= {k.replace("_gb", "_ms"): v / peak_tb_s for k, v in figures.items()}
    figures["step_ms"] = (
        matmul_ms + attention_ms + figures["dequant_ms"] + figures["elementwise_ms"] + figures["casts_ms"]
    )
    figures["tokens_per_s"] = tokens / figures["step_ms"] * 1000
    # The frozen products: 6 passes of the decoder weights, 4 of the LM head, 2 FLOP each multiply-add.
    figures["frozen_tflop"] = tokens * (6 * decoder_params + 4 * HIDDEN * VOCAB) / 1e12
    return figures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="least_traffic.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="Tokens a step (16 x 512 = 8192).")
    parser.add_argument("--matmul-ms", type=float, required=True, help="The profile's matmul ms a step.")
    parser.add_argument("--attention-ms", type=float, required=True, help="The profile's attention ms a step.")
    parser.add_argument("--peak-tb-s", type=float, required=True, help="The memory's peak TB/s (H200: 4.8).")
    parser.add_argument("--target", type=float, default=25000, help="Tokens/s to find the matmul rate for.")
    parser.add_argument("--fp8", action="store_true", help="Add the casts into FP8 (--fp8-matmuls on).")
    args = parser.parse_args(argv)
    f = bound(args.tokens, args.matmul_ms, args.attention_ms, args.peak_tb_s, fp8=args.fp8)
    print("| work | each of the 2 forwards | backward |\n|---|---|---|")
    for work, fwd, bwd, _ in rows():
        print(f"| {work} | {fwd:,.0f} | {bwd:,.0f} |")
    print(f"| dropout masks, from the recompute only | {masks():,.0f} (once) | |")
    print(
        f"\n{elements_per_token():,.0f} elements a token and layer: {f['all_gb']:.0f} GB a step, {f['all_ms']:.1f} ms "
        f"at {args.peak_tb_s} TB/s (element-wise {f['elementwise_gb']:.0f} GB, {f['elementwise_ms']:.1f} ms; LoRA's "
        f"matmuls {f['lora_ms']:.1f} ms). Dequantizations {f['dequant_gb']:.1f} GB, {f['dequant_ms']:.1f} ms."
    )
    casts = f" + {f['casts_ms']:.1f}" if args.fp8 else ""
    if args.fp8:
        print(f"The casts into FP8: {f['casts_gb']:.1f} GB, {f['casts_ms']:.1f} ms.")
    print(
        f"Shortest step: {args.matmul_ms} + {args.attention_ms} + {f['dequant_ms']:.1f} + {f['elementwise_ms']:.1f}"
        f"{casts} = {f['step_ms']:.1f} ms, {f['tokens_per_s']:,.0f} tokens/s."
    )
    budget_ms = args.tokens / args.target * 1000 - args.attention_ms - f["dequant_ms"] - f["all_ms"] - f["casts_ms"]
    print(
        f"{args.target:,.0f} tokens/s ({args.tokens / args.target * 1000:.1f} ms) needs the frozen matmuls "
        f"({f['frozen_tflop']:.0f} TFLOP) at {f['frozen_tflop'] / budget_ms * 1000:.0f} TFLOP/s or more."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
