"""The flat optimizer: all LoRA tensors updated by one 8-bit AdamW kernel over one flat tensor.

Why: bitsandbytes launches one update kernel a tensor from Python (256 a step on Phi-3-mini's LoRA
tensors), while the CUDA graph launches the whole forward and backward with one call; beside the
graph, the optimizer's launches become what the GPU waits for. Flat, the update is one launch.
It needs gradients that are never freed (their storage is one flat tensor), which is what the
CUDA graph's loop gives it: the eager loop frees its gradients every step and keeps the per-tensor
optimizer.
"""

import torch

from yoda_raw.errors import YodaError
from yoda_raw.optim import AdamW


def flat_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer over one flat tensor where that is exactly the same update (bitsandbytes'
    8-bit AdamW, every tensor of whole blocks: `FlatAdamW.flattens`); else `optimizer` itself."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if type(optimizer) is not AdamW or len(optimizer.param_groups) != 1 or not FlatAdamW.flattens(params):
        return optimizer
    group = optimizer.param_groups[0]
    hyper = {key: group[key] for key in ("lr", "betas", "eps", "weight_decay")}
    return FlatAdamW(params, optim_bits=optimizer.args.optim_bits, is_paged=optimizer.is_paged, **hyper)


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
