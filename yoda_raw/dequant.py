"""--reuse-dequant: each 4-bit weight dequantized once for the recompute and the backward, not twice.

Why: a 4-bit linear cannot multiply with its packed weight; bitsandbytes dequantizes it to the
compute dtype first, in every forward and again in backward (its `MatMul4Bit.backward` computes
grad_input = grad_output @ dequantize(W)). With gradient checkpointing a layer runs forward twice
(once in the forward pass, once recomputed just before its backward) and backward once: three
dequantizations of every weight a step, 14 ms of the H200's step at 16 x 64. Keeping the weight the
recompute dequantized until the backward, right after, saves one of the three.

What it costs: one layer's weights in the compute dtype while that layer's backward runs (Phi-3-mini:
113M weights a layer, 0.21 GiB in bf16). Nothing in the first forward: non-reentrant checkpointing
keeps none of what a checkpointed layer saves for backward, it recomputes it. Without checkpointing
every layer's weight would be kept (7.6 GB on Phi-3-mini), so it needs checkpointing on.

Measured on the H200 at 16 x 64 with compiled layers in the CUDA graph
(benchmarks/results/h200_flat/): 13,717 -> 14,402 tokens/s, peak allocated 2.86 -> 2.89 GiB.
"""

import types

import bitsandbytes as bnb
import torch

from yoda_raw.errors import YodaError
from yoda_raw.model import decoder_layers


def resolve(setting: str, cuda_graph: str, quant: str, gradient_checkpointing: bool) -> str:
    """--reuse-dequant auto|on|off -> "on" or "off". auto follows the CUDA graph, the fast path it
    was measured on, where the base is 4-bit and checkpointing is on; the eager loop stays plain.

    >>> resolve("auto", "on", "nf4", True), resolve("auto", "off", "nf4", True), resolve("auto", "on", "none", True)
    ('on', 'off', 'off')
    """
    if setting == "on" and quant != "nf4":
        raise YodaError("--reuse-dequant on needs a 4-bit base (--quant nf4); use --reuse-dequant off")
    if setting == "auto":
        return "on" if cuda_graph == "on" and quant == "nf4" and gradient_checkpointing else "off"
    return setting


class MatmulDequantizedOnce(torch.autograd.Function):
    """x @ W.T for a packed 4-bit W: dequantized in forward, and that copy used again in backward."""

    @staticmethod
    def forward(ctx, x, packed_weight, quant_state):
        weight = bnb.functional.dequantize_4bit(packed_weight, quant_state).to(x.dtype)  # (out, in)
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        return grad_output @ weight.to(grad_output.dtype), None, None  # the base is frozen: no weight gradient


def linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward for training (compute dtype, bias, output in the input's
    dtype) through MatmulDequantizedOnce. Without gradients (evaluation, the end-of-run samples)
    there is no backward to share with, and bitsandbytes' own forward has a faster kernel for
    one token at a time."""
    if not torch.is_grad_enabled():
        return bnb.nn.Linear4bit.forward(self, x)
    dtype = self.compute_dtype or x.dtype
    out = MatmulDequantizedOnce.apply(x.to(dtype), self.weight, self.weight.quant_state)
    if self.bias is not None:
        out = out + self.bias.to(dtype)
    return out.to(x.dtype)


def reuse_dequantized_weights(model) -> int:
    """Give every 4-bit linear of the checkpointed decoder layers the forward above; returns how
    many there were. A layer left out of checkpointing (--uncheckpointed-layers) keeps
    bitsandbytes' own: there the dequantized weight would be kept from the forward to the backward."""
    linears = [
        module
        for block in decoder_layers(model)
        if block.gradient_checkpointing
        for module in block.modules()
        if isinstance(module, bnb.nn.Linear4bit)
    ]
    for linear in linears:
        linear.forward = types.MethodType(linear4bit_forward, linear)
    return len(linears)
