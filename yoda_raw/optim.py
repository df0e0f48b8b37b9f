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

from yoda_raw.errors import YodaError


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


BLOCK = 256  # elements per 8-bit state block (one absmax each), bitsandbytes' blockwise AdamW


class FlatAdamW(AdamW):
    """The same 8-bit AdamW over one flat tensor: every trainable parameter becomes a view of it, and
    its gradient a view of the flat gradient. bitsandbytes updates a tensor with one kernel launched
    from Python: 256 launches a step on Phi-3-mini's LoRA tensors, while the CUDA graph's whole
    forward and backward is one. Flat, the update is one launch, and the NaN guard's and
    zero_grad's work one kernel each.

    Exactly the per-tensor update when every tensor has whole 256-element blocks and the 4096+
    elements that get 8-bit state (`flattens`): the blocks, and so each block's scale, are the same.
    The gradients must stay where they are: zero_grad zeroes them in place, and nothing may free
    them (the CUDA graph's loop never does; the eager loop does, so it does not use this).

    Checkpoints hold bitsandbytes' own per-tensor state (`state_dict`, `load_state_dict`), so a run
    resumes from either layout into either. Flat, the whole state is one tensor of 100,000+
    elements, so all of it is paged (25 MB on Phi-3-mini).

    Measured on the H200 at 16 x 64 with compiled layers in the CUDA graph: 12,642 -> 13,717
    tokens/s, the GPU waiting for the host 10.4 -> 5.2 ms a step (benchmarks/results/h200_flat/).
    """

    def __init__(self, params, **hyper):
        self.views, self.hyper = list(params), hyper
        flat = torch.cat([p.detach().reshape(-1) for p in self.views])
        flat_grad = torch.zeros_like(flat)
        for p, data, grad in zip(self.views, self._shaped(flat), self._shaped(flat_grad), strict=True):
            p.data, p.grad = data, grad  # the parameter and its gradient now live in the flat tensors
        self.flat = torch.nn.Parameter(flat)  # shares flat's storage
        self.flat.grad = flat_grad
        super().__init__([self.flat], **hyper)

    @staticmethod
    def flattens(params) -> bool:
        """Whether the flat update is exactly the per-tensor one for these parameters."""
        whole_blocks = all(p.numel() % BLOCK == 0 and p.numel() >= 4096 for p in params)
        return whole_blocks and len({(p.dtype, p.device) for p in params}) == 1

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.flat.grad.zero_()  # never freed: the parameters' gradients are views of it

    def _shaped(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat tensor (values, gradients or 8-bit states), one per parameter, its shape."""
        chunks = flat.split([p.numel() for p in self.views])
        return [c.view_as(p) for c, p in zip(chunks, self.views, strict=True)]

    def _blocks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat per-block tensor (absmax: one scale per 256 elements) split by parameter."""
        return list(flat.split([p.numel() // BLOCK for p in self.views]))

    def state_dict(self):
        """bitsandbytes' per-tensor state_dict: that of a per-tensor AdamW whose states are views of ours."""
        twin = AdamW(self.views, **self.hyper)
        state = self.state.get(self.flat)
        if state:
            per_tensor = zip(
                self.views,
                self._shaped(state["state1"]),
                self._shaped(state["state2"]),
                self._blocks(state["absmax1"]),
                self._blocks(state["absmax2"]),
                strict=True,
            )
            for p, state1, state2, absmax1, absmax2 in per_tensor:
                twin.state[p] = state | dict(state1=state1, state2=state2, absmax1=absmax1, absmax2=absmax2)
        return twin.state_dict()

    def load_state_dict(self, state_dict, move_to_device=True):
        """Load bitsandbytes' per-tensor state_dict (ours or PagedAdamW8bit's) into the flat state."""
        twin = AdamW(self.views, **self.hyper)
        twin.load_state_dict(state_dict, move_to_device)
        states = [twin.state.get(p, {}) for p in self.views]
        self.param_groups[0].update({k: v for k, v in twin.param_groups[0].items() if k != "params"})
        if not any(states):
            # No step taken yet: nothing to load. Accelerate's prepare() round-trips every
            # optimizer's state_dict (to move it to the device), fresh ones included.
            self.state.clear()
            return
        if not all(s.get("state1") is not None and s["state1"].dtype == torch.uint8 for s in states):
            raise YodaError("the checkpoint's optimizer state is not 8-bit AdamW state for these parameters")

        def joined(key: str) -> torch.Tensor:
            return torch.cat([s[key].reshape(-1).to(self.flat.device) for s in states])

        state1 = self.get_state_buffer(self.flat, dtype=torch.uint8)  # paged, where paging is on
        state2 = self.get_state_buffer(self.flat, dtype=torch.uint8)
        state1.copy_(joined("state1"))
        state2.copy_(joined("state2"))
        self.state[self.flat] = states[0] | dict(
            state1=state1, state2=state2, absmax1=joined("absmax1"), absmax2=joined("absmax2")
        )


def build_optimizer(
    params, name: str, lr: float, weight_decay: float, device: torch.device, flat: bool = False
) -> torch.optim.Optimizer:
    """--optim as the Trainer builds it. flat: one FlatAdamW over all the parameters where that is
    exactly the same update (8-bit AdamW, tensors of whole blocks); the caller keeps the gradients."""
    params = [p for p in params if p.requires_grad]
    hyper = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, **hyper)
    if name not in ("paged_adamw_8bit", "adamw_8bit"):
        raise YodaError(f"--optim must be paged_adamw_8bit, adamw_8bit or adamw, got {name!r}")
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
    if flat and FlatAdamW.flattens(params):
        return FlatAdamW(params, optim_bits=8, is_paged=paged, **hyper)
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
