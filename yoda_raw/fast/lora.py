"""--lora-addmm: LoRA's product added to the base product by the matmul itself.

peft computes a LoRA linear as two small products, then an add:

    y = base(x) + lora_B(lora_A(dropout(x))) * scale            scale = alpha / r

lora_B's product is (tokens, out), as large as the layer's output: it is written out whole, then
read back beside the base product, and their sum written again. At 16 rows of 512 tokens an
o_proj's or down_proj's output is 48 MiB, moved three times over for the add, in the forward and
again in the recompute. `torch.addmm(C, h, B.T, alpha=scale)` is C + scale * (h @ B.T) in one
matmul (cuBLAS reads C as it writes the result): the base product goes in as C, lora_B's product
is never written on its own, and the sum is rounded once instead of twice.

Where what follows y is element-wise anyway (the activation after gate_up_proj, rotary after
qkv_proj), torch.compile on a GPU splits addmm back into a matmul and an add that it fuses into
what follows (inductor's unfuse_bias_add_to_pointwise): there this changes nothing. It can pay only
where y leaves the compiled code as it is, as o_proj's and down_proj's outputs do from
--split-layers' halves (the residual add is outside them).

auto is off: whether it pays on a GPU is for a benchmark to say (benchmarks/NOTES.md, step 42).
"""

import types

import torch
from peft.tuners.lora import LoraLayer


def resolve(setting: str) -> str:
    """--lora-addmm auto|on|off -> "on" or "off"; auto is off until measured.

    >>> resolve("auto"), resolve("on"), resolve("off")
    ('off', 'on', 'off')
    """
    return "on" if setting == "on" else "off"


def use_addmm(model) -> int:
    """Every LoRA linear of `model` adds its product with addmm (`addmm_forward`); returns how many.
    LoRA on other layers (embeddings, convolutions) keeps peft's forward: addmm is a linear's."""
    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), torch.nn.Linear):
            module.forward = types.MethodType(addmm_forward, module)
            count += 1
    return count


def addmm_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's forward for one plain LoRA adapter, B's product added inside its matmul. Anything else
    (adapters off or merged, several, a LoRA variant, extra arguments, or dtypes peft casts between
    outside autocast) runs peft's own forward."""
    adapters = [name for name in self.active_adapters if name in self.lora_A]
    plain = len(adapters) == 1 and adapters[0] not in self.lora_variant and not (args or kwargs)
    if not plain or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    name = adapters[0]
    lora_A, lora_B = self.lora_A[name], self.lora_B[name]
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != lora_A.weight.dtype:
        return type(self).forward(self, x)
    result = self.base_layer(x)  # (..., out)
    h = lora_A(self.lora_dropout[name](x))  # (..., r)
    # (tokens, out) + scale * (tokens, r) @ (r, out): the rows laid end to end, as a matmul takes them.
    y = torch.addmm(
        result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_B.weight.t(), alpha=self.scaling[name]
    )
    return y.view(result.shape).to(result.dtype)  # peft's sum is in the base product's dtype, autocast or not
