"""--seeded-dropout: LoRA's dropout masks drawn from one seed a module and micro-step.

Why: LoRA's dropout (the tutorial's 0.05, on the input of every LoRA module) is a large share of a
checkpointed step's element-wise work at long rows. Compiled, torch's dropout draws one
Philox random number an element (each call makes four; three go unused), and the compiled
recompute draws them all again in the backward. This dropout draws one seed (a random integer on
the device) and makes the mask from it, four elements from each Philox call (kernels.py on a CUDA
GPU). The mask depends on the seed alone, so torch.compile's recompute calls it again with the same
seed instead of keeping the mask from the forward to the backward, and eager checkpointing's
recompute redraws the same seed (it restores the random state).

The same dropout in distribution: each element kept with probability 1 - p (to one part in 2^32),
the kept ones scaled by 1 / (1 - p). Not the same masks as torch's dropout (another random stream),
so not SFTTrainer's masks either.
"""

import torch


def resolve(setting: str, fast_path: bool, lora_dropout: float) -> str:
    """--seeded-dropout auto|on|off -> "on" or "off". auto is on in the fast path (`fast_path`: the
    CUDA graph with compiled layers, where it pays) when LoRA has dropout. Off elsewhere: the eager
    loop keeps torch's dropout,
    the tutorial's.

    >>> resolve("auto", True, 0.05), resolve("auto", True, 0.0), resolve("auto", False, 0.05), resolve("on", False, 0.1)
    ('on', 'off', 'off', 'on')
    """
    if setting == "auto":
        return "on" if fast_path and lora_dropout > 0 else "off"
    return setting


@torch.library.custom_op("yoda_raw::dropout_mask", mutates_args=())
def dropout_mask(seed: torch.Tensor, numel: int, p: float) -> torch.Tensor:
    """`numel` booleans, each True with probability 1 - p, from `seed` alone (the same seed, the same
    mask). Here with a torch generator seeded on the host; on CUDA one Triton kernel (below)."""
    generator = torch.Generator(device=seed.device).manual_seed(int(seed))
    return torch.rand(numel, generator=generator, device=seed.device) >= p


@dropout_mask.register_fake
def _(seed, numel, p):
    return seed.new_empty((numel,), dtype=torch.bool)


@dropout_mask.register_kernel("cuda")
def _(seed, numel, p):
    from yoda_raw.fast import kernels  # Triton: torch's CUDA builds have it, CPU ones need not

    return kernels.dropout_mask(seed, p, torch.empty(numel, dtype=torch.bool, device=seed.device))


class SeededDropout(torch.nn.Module):
    """torch.nn.Dropout(p) with its mask from dropout_mask: a new seed each call."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seed = torch.randint(0, 2**62, (), device=x.device)
        keep = dropout_mask(seed, x.numel(), self.p).view(x.shape)
        return x * keep * (1 / (1 - self.p))


def use_seeded_dropout(model) -> int:
    """Put SeededDropout in place of every LoRA module's torch dropout (peft keeps them in a
    `lora_dropout` dict, one an adapter); returns how many."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if isinstance(dropout, torch.nn.Dropout):
                dropouts[name] = SeededDropout(dropout.p).train(dropout.training)
                count += 1
    return count
