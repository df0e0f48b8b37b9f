"""--offload-activations: what the forward keeps for the backward waits in host memory.

Gradient checkpointing keeps one tensor per decoder layer from the forward to the backward: the
layer's input, (B, T, H), from which the backward recomputes the rest. On Phi-3-mini that is 32 of
them; at 16 rows of 512 tokens each is 16 x 512 x 3,072 bf16 = 48 MiB, 1.5 GiB in all, the largest
thing a long-row step holds besides the weights. None of them is read until the backward reaches
its layer, so they can wait in the host's memory instead:

- forward: as autograd saves each input, it is copied to a pinned host buffer on a second CUDA
  stream, while the GPU computes the next layers. The GPU copy is freed IN_FLIGHT saves later,
  once the main stream has waited for its copy (by then long done).
- backward: when a layer's input is needed, the one of the layer before it (the next the backward
  will need) starts coming back, on the second stream, while this layer recomputes and runs its
  backward. So a layer never waits for its input, except the first, and the GPU holds one or two
  layer inputs at a time instead of all of them.

The costs: PCIe traffic, 2 x 1.5 GiB a step at 16 x 512, mostly hidden behind compute (the copy
grows with B x T, as a layer's compute does), and page-locked host memory as large as what is
offloaded, held for the whole run. What is not hidden is measured in benchmarks/NOTES.md; while it
costs speed, `auto` leaves the option off.

Only what the decoder layers save goes. What the forward saves after the last layer, the final
norm's inputs and the loss's (its chunks, or the whole loss's log-softmax), is what the backward
needs first, at once: copied out, it would only come straight back, with the backward waiting for
it. It stays on the GPU, and the backward frees it before it reaches the layers, whose own backward
(the MLP's wide products) is the step's peak at the long rows offloading is for.

How: `torch.autograd.graph.saved_tensors_hooks` replaces every tensor autograd saves inside the
block by what `pack` returns, and gives `unpack` that back in the backward. Inside a checkpointed
layer checkpointing's own hooks are the innermost and take over, so what reaches `pack` is what
the forward saves outside them: each layer's input above all (with --split-layers, each half's),
and all an uncheckpointed layer saves. A hook on the final norm says where the layers end (a model
with no `norm` beside its `layers` offloads everything to the end of the forward). Weights are left
where they are (they stay on the GPU anyway), and so are tensors under `min_bytes` (not worth a
copy).

The CUDA graph replays the copies too: the host buffers are made once, in the eager first step,
at fixed addresses, and every copy joins back into the main stream before the step ends.
"""

import torch

from yoda_raw.model import final_norm

MIN_BYTES = 1 << 20  # smaller tensors stay on the GPU: the copy's fixed cost outweighs what it frees
IN_FLIGHT = 2  # forward copies in flight at once: the GPU frees a tensor this many saves later


class Saved:
    """One offloaded tensor: its host copy, and while it is needed its GPU copy, with the events that
    say the copies between them are done."""

    def __init__(self, index: int, host: torch.Tensor, gpu, copied):
        self.index, self.host, self.gpu, self.copied = index, host, gpu, copied
        self.fetched = None  # the event of the copy back, once it has started (see `_fetch`)
        self.unpacked = False  # given back to the backward already: not worth fetching ahead


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Inside the block, the tensors autograd saves for the backward are kept in host memory (see
    the module docstring). Enter it around each micro-batch's forward; the backward runs after the
    block, on the same stream. `model`: its weights are never moved."""

    def __init__(self, model, device: torch.device, min_bytes: int = MIN_BYTES):
        self.device, self.min_bytes = device, min_bytes
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        # On a CPU the tensors are in host memory already: the same bookkeeping, with plain copies
        # (what the tests of this module run); on a GPU the copies go on a stream of their own.
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.main = None  # the stream the forward runs on (a CUDA graph's capture has its own)
        self.buffers: list[torch.Tensor] = []  # host memory, one buffer a saved tensor, reused every step
        self.saved: list[Saved] = []  # this forward's offloaded tensors, in the order they were saved
        self._joined_at_end = False
        self.layers_done = False  # the forward has passed its last decoder layer: nothing more goes
        self.norm = final_norm(model)  # where the layers end; None: nothing says so
        self._norm_hook = None  # its hook, inside the block only
        super().__init__(self.pack, self.unpack)

    def __enter__(self):
        self.settle()  # what an earlier step left, abandoned by a signal or an error included
        self.saved, self._joined_at_end, self.layers_done = [], False, False
        self.main = torch.cuda.current_stream(self.device) if self.side is not None else None
        # The hook is the block's: left on the model, it would keep this offloader and its host
        # buffers alive after the run made another (--auto-batch-size's retry makes one an attempt).
        if self.norm is not None:
            self._norm_hook = self.norm.register_forward_pre_hook(self._at_final_norm)
        return super().__enter__()

    def __exit__(self, *exc_info):
        if self._norm_hook is not None:
            self._norm_hook.remove()
            self._norm_hook = None
        return super().__exit__(*exc_info)

    # --- the forward ---------------------------------------------------------------------------

    def _at_final_norm(self, module, args) -> None:
        self.layers_done = True

    def pack(self, tensor: torch.Tensor):
        if self.layers_done or not self._worth_moving(tensor):
            return tensor
        host = self._host_buffer(len(self.saved), tensor)
        if self.side is None:
            host.copy_(tensor)
            saved = Saved(len(self.saved), host, None, None)
        else:
            # The GPU copy of the tensor saved IN_FLIGHT saves ago can go: its copy has had the
            # time of the layers since to finish (each save lets one go, so all before it are gone).
            if len(self.saved) >= IN_FLIGHT:
                self._release(self.saved[-IN_FLIGHT])
            # The copy waits for the kernels that wrote `tensor`, then runs beside the next layer's.
            self.side.wait_stream(self.main)
            with torch.cuda.stream(self.side):
                host.copy_(tensor, non_blocking=True)
                copied = self.side.record_event()
            saved = Saved(len(self.saved), host, tensor, copied)  # `tensor` stays until the copy has read it
        self.saved.append(saved)
        return saved

    def _worth_moving(self, tensor: torch.Tensor) -> bool:
        return (
            tensor.device.type == self.device.type  # one device a process: "cuda" is "cuda:0" here
            and tensor.is_floating_point()
            and tensor.nbytes >= self.min_bytes
            and tensor.untyped_storage().data_ptr() not in self.weights
        )

    def _host_buffer(self, index: int, tensor: torch.Tensor) -> torch.Tensor:
        """The index-th saved tensor's host buffer, a view shaped as `tensor`. Made at the first
        step (and again, larger, should a later step save more), so that a CUDA graph's replays
        copy to the very addresses its capture recorded."""
        if index == len(self.buffers):
            self.buffers.append(torch.empty(0, dtype=torch.uint8))
        if self.buffers[index].numel() < tensor.nbytes:
            pinned = self.side is not None  # page-locked: the GPU copies to and from it on its own
            self.buffers[index] = torch.empty(tensor.nbytes, dtype=torch.uint8, pin_memory=pinned)
        return self.buffers[index][: tensor.nbytes].view(tensor.dtype).view(tensor.shape)

    # --- the backward --------------------------------------------------------------------------

    def unpack(self, saved):
        if not isinstance(saved, Saved):
            return saved  # left on the GPU
        if self.side is None:
            return saved.host.clone()  # the buffer is the next micro-batch's
        if not self._joined_at_end:
            # At the end of this backward every copy joins back into the main stream (a CUDA
            # graph's capture requires it), a tensor fetched ahead and not used included.
            torch.autograd.Variable._execution_engine.queue_callback(self.settle)
            self._joined_at_end = True
        if saved.gpu is None:  # fetched ahead, or not: then this layer waits for its copy
            self._fetch(saved)
        # The last tensors saved may still be on the GPU: used as they are, after their copy to
        # host, which reads them, is done.
        self.main.wait_event(saved.fetched or saved.copied)
        tensor, saved.gpu, saved.copied, saved.fetched = saved.gpu, None, None, None
        saved.unpacked = True
        # Fetch ahead the tensor saved before this one: the backward, running the forward in
        # reverse, needs it next.
        earlier = self.saved[saved.index - 1] if saved.index > 0 else None
        if earlier is not None and earlier.gpu is None and not earlier.unpacked:
            self._fetch(earlier)
        return tensor

    def _fetch(self, saved: Saved) -> None:
        """Start copying `saved` back to the GPU on the side stream. Its GPU memory is allocated on
        the main stream, which uses and frees it; the side stream first waits for what the main
        stream did before (the memory may have been another tensor's until then)."""
        saved.gpu = torch.empty(saved.host.shape, dtype=saved.host.dtype, device=self.device)
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            saved.gpu.copy_(saved.host, non_blocking=True)
            saved.fetched = self.side.record_event()

    # --- joining the streams -------------------------------------------------------------------

    def _release(self, saved: Saved) -> None:
        """The main stream waits for `saved`'s copy to host; then its GPU copy can go."""
        if saved.copied is not None:
            self.main.wait_event(saved.copied)
        saved.gpu, saved.copied = None, None

    def settle(self) -> None:
        """Every copy started joins the main stream, and no GPU copy is held any more. Run at the end
        of each backward, at the next forward's start, and by a CUDA graph's capture that an error
        cuts short (a capture cannot end while another stream's work is not joined back)."""
        for saved in self.saved:
            for event in (saved.copied, saved.fetched):
                if event is not None:
                    self.main.wait_event(event)
            saved.gpu = saved.copied = saved.fetched = None
