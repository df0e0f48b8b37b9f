"""The optimizer (bitsandbytes' paged 8-bit AdamW) and the learning-rate schedule (linear decay).

8-bit AdamW keeps Adam's two moments in 8 bits with a per-block scale instead of 32 bits: 2 bytes
of state per parameter instead of 8. bitsandbytes does that only for tensors of 4096+ elements
(`min_8bit_size`); smaller ones keep 32-bit state. "Paged" puts the state in CUDA unified memory,
which the driver can move to CPU RAM under memory pressure instead of failing with out-of-memory;
bitsandbytes pages only tensors of 100,000+ elements (on Phi-3-mini only the 32
`gate_up_proj.lora_B`). Paged memory is invisible to torch.cuda.max_memory_allocated; NVML sees it.

Hyper-parameters are the Hugging Face Trainer's defaults, which the tutorial used: betas
(0.9, 0.999), eps 1e-8 and weight decay 0. Careful: bitsandbytes' own AdamW classes default to
weight decay 0.01, so it is always passed explicitly here.
"""

import sys

import bitsandbytes as bnb
import torch


class AdamW(bnb.optim.AdamW):
    """bitsandbytes' AdamW with a step that does not wait for the GPU.

    bitsandbytes' own step (0.50) calls torch.cuda.synchronize() after every parameter's update and
    once more at the end of a paged step: on Phi-3-mini 129 host-device round trips a step, with the
    GPU idle through each. The updates are kernels on one stream, which run in order anyway, and
    nothing here reads the optimizer state on the host; so this is bitsandbytes' loop without the
    waits: the same kernels in the same order, the same results (tests/test_gpu.py checks it).
    """

    @torch.no_grad()
    def step(self, closure=None):
        assert closure is None, "the loop computes the loss itself"
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                if not self.state[param]:
                    self.init_state(group, param, gindex, pindex)
                self.prefetch_state(param)  # paged state: ask the driver to have it on the GPU
                self.update_step(group, param, gindex, pindex)


def build_optimizer(params, name: str, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """--optim as the Trainer builds it (config.py checks the name)."""
    params = [p for p in params if p.requires_grad]
    hyper = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, **hyper)
    paged = name == "paged_adamw_8bit"
    if paged and device.type != "cuda":
        # Unified memory is a CUDA feature; the same 8-bit update runs unpaged.
        print(
            "paged_adamw_8bit: paging needs a CUDA GPU; on this device the optimizer runs as adamw_8bit "
            "(same update, state not paged)",
            file=sys.stderr,
        )
        paged = False
    # bnb.optim.AdamW(optim_bits=8, is_paged=True) is exactly what the Trainer builds for
    # optim="paged_adamw_8bit"; the subclass below only takes out its waits.
    return AdamW(params, optim_bits=8, is_paged=paged, **hyper)


def learning_rate(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warm-up from 0 to `peak_lr`
    over `warmup_steps`, then linear decay to 0 at `total_steps`. The Trainer's default schedule
    (`get_linear_schedule_with_warmup`), written as a plain function of the step, nanoGPT-style:
    nothing to save in a checkpoint, and a resumed run gets the same rates by construction.

    With lr 3e-4, no warm-up and 220 steps: step 0 uses 3e-4, step 110 1.5e-4, step 219 1.4e-6.
    """
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
