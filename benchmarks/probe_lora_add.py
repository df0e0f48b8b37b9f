"""Probe (issue 12, benchmarks/NOTES.md): what adding LoRA's product to the frozen base's costs, and
what is left of it when a matmul does the add.

    python benchmarks/probe_lora_add.py --tokens 8192 --json DIR/probe_lora_add.json   # a GPU, 16 x 512
    python benchmarks/probe_lora_add.py --tokens 32 --check-only                       # a CPU: the forms agree

A LoRA linear computes y = x W^T + s (dropout(x) A^T) B^T. peft writes the base product and the
LoRA product as two tensors, then a kernel reads both and writes the sum (in a compiled layer one
fused kernel with the scaling): five passes over an output-sized tensor. The other forms:

    addmm     torch.addmm(base, h, B^T, alpha=s): the LoRA GEMM adds base in (into a new tensor)
    addmm_    base.addmm_(h, B^T, alpha=s): in place, the LoRA GEMM reads base and writes the sum
    concat    one GEMM of [x | h] with [W | s B] (K = in + r); its backward gives x, h and B their
              gradients and computes none for the frozen W

For each of Phi-3-mini's four projections (W in bf16, as --reuse-dequant holds it once dequantized)
and each form, eager and torch.compile'd: the forward with autograd recording (what the forward
and the checkpointed recompute run) and the forward with its backward (gradients for x, A and B),
timed with CUDA events. First every form's output and gradients are checked against peft's form
(dropout 0); the timings use the tutorial's dropout, 0.05. A checkpointed step runs, per layer, two
forwards and one backward: the table's last column is 32 layers x (forward + forward and backward).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # yoda_raw and benchmarks/

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.matmul_peak import PHI3_LINEARS, time_ms  # noqa: E402

RANK, SCALE, DROPOUT, LAYERS = 8, 2.0, 0.05, 32  # the tutorial's LoRA: r 8, alpha 16


class ConcatLinear(torch.autograd.Function):
    """[x | h] @ [W | s B]^T in one GEMM. Backward: one GEMM for the gradients of x and h together,
    one small one for B's; none for W (frozen)."""

    @staticmethod
    def forward(ctx, x, h, weight, lora_b, scale):
        wide = torch.cat([weight, lora_b * scale], dim=1)  # (out, in + r)
        ctx.save_for_backward(h, wide)
        ctx.scale, ctx.split = scale, x.shape[-1]
        return torch.cat([x, h], dim=-1) @ wide.T

    @staticmethod
    def backward(ctx, grad):
        h, wide = ctx.saved_tensors
        grad_x, grad_h = (grad @ wide).split([ctx.split, wide.shape[1] - ctx.split], dim=-1)
        return grad_x, grad_h, None, ctx.scale * (grad.T @ h), None


def peft_form(x, weight, lora_a, lora_b, p):
    return F.linear(x, weight) + F.linear(F.linear(F.dropout(x, p), lora_a), lora_b) * SCALE


def addmm_form(x, weight, lora_a, lora_b, p):
    return torch.addmm(F.linear(x, weight), F.linear(F.dropout(x, p), lora_a), lora_b.T, alpha=SCALE)


def addmm_inplace_form(x, weight, lora_a, lora_b, p):
    return F.linear(x, weight).addmm_(F.linear(F.dropout(x, p), lora_a), lora_b.T, alpha=SCALE)


def concat_form(x, weight, lora_a, lora_b, p):
    return ConcatLinear.apply(x, F.linear(F.dropout(x, p), lora_a), weight, lora_b, SCALE)


FORMS = {"peft": peft_form, "addmm": addmm_form, "addmm_": addmm_inplace_form, "concat": concat_form}


def make_inputs(tokens: int, in_features: int, out_features: int, dtype, device, seed: int = 0) -> dict:
    """x and the LoRA matrices trainable (x: the input gradient flows on), W frozen; B not zero, as
    after some training, so its product counts."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0, grad=False):
        values = (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)
        return values.requires_grad_(grad)

    return {
        "x": randn(tokens, in_features, grad=True),
        "weight": randn(out_features, in_features, scale=in_features**-0.5),
        "lora_a": randn(RANK, in_features, scale=in_features**-0.5, grad=True),
        "lora_b": randn(out_features, RANK, scale=RANK**-0.5, grad=True),
        "grad": randn(tokens, out_features),
    }


def outputs_and_gradients(form, inputs: dict) -> list[torch.Tensor]:
    for name in ("x", "lora_a", "lora_b"):
        inputs[name].grad = None
    y = form(inputs["x"], inputs["weight"], inputs["lora_a"], inputs["lora_b"], 0.0)
    y.backward(inputs["grad"])
    return [y.detach(), inputs["x"].grad, inputs["lora_a"].grad, inputs["lora_b"].grad]


def check_forms(inputs: dict, compiled: bool = False) -> dict:
    """Each form's largest difference from peft's (output, then the gradients of x, A, B), relative
    to the largest value of peft's, with dropout 0."""
    reference = outputs_and_gradients(peft_form, inputs)
    differences = {}
    for name, form in FORMS.items():
        run = torch.compile(form, dynamic=False) if compiled else form
        got = outputs_and_gradients(run, inputs)
        differences[name] = max(
            ((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
            for g, r in zip(got, reference, strict=True)
        )
    return differences


def time_form(form, inputs: dict, iterations: int) -> dict:
    x, weight, lora_a, lora_b, grad = (inputs[k] for k in ("x", "weight", "lora_a", "lora_b", "grad"))

    def forward():
        form(x, weight, lora_a, lora_b, DROPOUT)  # autograd records, as in the forward and the recompute

    def forward_backward():
        for tensor in (x, lora_a, lora_b):
            tensor.grad = None
        form(x, weight, lora_a, lora_b, DROPOUT).backward(grad)

    return {"forward_ms": time_ms(forward, iterations), "forward_backward_ms": time_ms(forward_backward, iterations)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="probe_lora_add.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="Rows of x: tokens a step (16 x 512 = 8192).")
    parser.add_argument("--iterations", type=int, default=50, help="Timed repetitions of each.")
    parser.add_argument("--check-only", action="store_true", help="Only check that the forms agree.")
    parser.add_argument("--json", help="Write the figures here.")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.check_only:
        common.fail("probe_lora_add.py times on a CUDA GPU; on a CPU run it with --check-only")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    # Each form compiles for 4 shapes and 2 dropout rates: past dynamo's default of 8 recompiles a
    # function would run eager from then on, and its "compiled" timings would be eager ones.
    torch._dynamo.config.recompile_limit = 64
    tolerance = 2e-2 if cuda else 1e-5  # bf16 rounds the sum at other points in each form

    result = {"device": common.device_name(), "versions": common.versions(), "date": common.now_utc()}
    result |= {"tokens": args.tokens, "checks": {}, "timings": {}}
    result["command"] = "python benchmarks/probe_lora_add.py " + " ".join(argv)
    for name, in_features, out_features in PHI3_LINEARS:
        inputs = make_inputs(args.tokens, in_features, out_features, dtype, device)
        for mode in ("eager", "compiled") if cuda else ("eager",):
            checked = check_forms(inputs, compiled=mode == "compiled")
            result["checks"][f"{name} {mode}"] = checked
            wrong = [form for form, difference in checked.items() if not difference <= tolerance]
            if wrong:
                common.fail(f"{name} ({mode}): {', '.join(wrong)} differ from peft's form: {checked}")
            if not args.check_only:
                for form_name, form in FORMS.items():
                    run = torch.compile(form, dynamic=False) if mode == "compiled" else form
                    result["timings"][f"{name} {form_name} {mode}"] = time_form(run, inputs, args.iterations)
    print(json.dumps(result["checks"], indent=1))
    if not args.check_only:
        print(table(result["timings"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def table(timings: dict) -> str:
    """Per form and mode: forward, forward and backward, summed over the four projections, and a
    checkpointed step's share (32 layers x both)."""
    lines = [
        "| form | mode | forward (ms) | forward and backward (ms) | a step, 32 layers (ms) |",
        "|---|---|---|---|---|",
    ]
    for mode in ("eager", "compiled"):
        for form in FORMS:
            runs = [t for key, t in timings.items() if key.endswith(f" {form} {mode}")]
            if runs:
                forward = sum(r["forward_ms"] for r in runs)
                both = sum(r["forward_backward_ms"] for r in runs)
                lines.append(f"| {form} | {mode} | {forward:.3f} | {both:.3f} | {LAYERS * (forward + both):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
