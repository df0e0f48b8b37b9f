"""--lora-addmm: LoRA's product added to the base product by the matmul itself.

peft computes a LoRA linear as two small products, then an add:

    y = base(x) + lora_B(lora_A(dropout(x))) * scale            scale = alpha / r

lora_B's product is (tokens, out), as large as the layer's output: it is written out whole, then
read back beside the base product, and their sum written again. At 16 rows of 512 tokens an
o_proj's or down_proj's output is 48 MiB, moved three times over for the add, in the forward and
again in the recompute. `torch.addmm(C, h, B.T, alpha=scale)` is C + scale * (h @ B.T) in one
matmul (cuBLAS reads C as it writes the result): the base product goes in as C, lora_B's product
is never written on its own, and the sum is rounded once instead of twice.

Where y leaves the compiled code as it is, as o_proj's and down_proj's outputs do from
--split-layers' halves (the residual add is outside them), the add was a kernel of its own. There
addmm takes memory off the step's peak at the same speed: the time the add's kernel took, cuBLAS
now spends reading C. In whole compiled layers, where the add fused into the residual add already,
it costs speed and saves less. So auto is on where the layers are split and compiled, off elsewhere
(benchmarks/NOTES.md, item 81).
"""

import types

import torch
from peft.tuners.lora import LoraLayer


def resolve(setting: str, split_and_compiled: bool) -> str:
    """--lora-addmm auto|on|off -> "on" or "off"; auto: on in compiled --split-layers halves.

    >>> resolve("auto", True), resolve("auto", False), resolve("on", False), resolve("off", True)
    ('on', 'off', 'on', 'off')
    """
    return setting if setting != "auto" else ("on" if split_and_compiled else "off")


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
