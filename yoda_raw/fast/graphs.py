"""--cuda-graph: a micro-batch's forward and backward recorded once as a CUDA graph, then replayed
every micro-batch (on by default where it can run: one CUDA GPU, bf16 or fp32).

Why it is faster: at the tutorial's 16 rows x 64 tokens the GPU mostly waits. An eager micro-batch
is tens of thousands of small kernels (32 layers; forward, the checkpointing recompute and backward;
per layer, four 4-bit linears with their dequantization and LoRA, norms, rotary embeddings,
attention), and Python launches them one at a time, each faster to run than to launch. A CUDA graph
records the whole sequence once; a replay launches all of it with one call. The arithmetic stays;
the launch overhead goes. Memory stays that of the eager loop: the graph keeps one set of
activation buffers, sized by the same peak.

What a graph needs, and how the loop gives it:
- fixed shapes and addresses: every micro-batch is copied into the same (B, T) buffers, B =
  --batch-size and T = --max-length. A short batch (the last of an epoch) gets extra rows of
  padding whose labels are all masked: they add 0 to the loss and to every gradient.
- no host sync inside, and one code path: given a 2D padding mask, transformers reads it on the
  host to skip it when nothing is padded, and while a stream is capturing it builds a mask instead
  (some versions do so even given no mask): the warm-up and the capture would then run different
  code, and compiled layers would recompile inside the capture, which fails. So the graph passes no
  mask, and runs SDPA under a name of its own (CAUSAL_SDPA): transformers builds no mask for an
  attention it does not know, and SDPA applies its own causal masking (`is_causal`), in the warm-up
  and the capture alike. Rows are padded on the right only, and under causal attention a real token
  never attends to the padding after it, so every real position computes exactly what it did with
  the padding mask. The causal kernels also skip the masked half of the scores, which a
  ready-made (B, 1, T, T) mask would make them compute.
- gradients at fixed addresses: they exist (as zeros) before the capture, the graph adds into them,
  and the loop zeroes them in place (`zero_grad(set_to_none=False)`) instead of freeing them.
- one process (DDP's gradient all-reduce would have to be captured too), and no fp16 loss
  scaler (it reads its scale on the host and may skip steps). `--cuda-graph auto`, the default,
  turns the graph on wherever these hold and leaves the eager loop elsewhere.
The first step runs eagerly on the same buffers (the warm-up the capture needs); the second is
captured and replayed, and every later one replayed. Clipping, the NaN check and the optimizer
step stay eager, after the replays of a step.
"""

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from yoda_raw.chat import IGNORE
from yoda_raw.errors import YodaError
from yoda_raw.loss import token_loss_sum


def why_not(device: torch.device, num_processes: int, precision_name: str) -> str:
    """Why the CUDA graph cannot run here ("" where it can).

    >>> why_not(torch.device("cpu"), 1, "fp32")
    'needs a CUDA GPU'
    """
    if device.type != "cuda":
        return "needs a CUDA GPU"
    if num_processes > 1:
        return f"runs on one process (this run has {num_processes})"
    if precision_name == "fp16":
        return "does not support --precision fp16 (its loss scaler reads its scale on the host); use bf16 or fp32"
    return ""


def resolve(setting: str, why_not_here: str) -> str:
    """--cuda-graph auto|on|off -> "on" or "off" for this run; "on" where it cannot run is an error.

    >>> resolve("auto", ""), resolve("auto", "needs a CUDA GPU"), resolve("off", "")
    ('on', 'off', 'off')
    """
    if setting == "on" and why_not_here:
        raise YodaError(f"--cuda-graph on {why_not_here}; use --cuda-graph auto or off")
    return "off" if setting == "off" or why_not_here else "on"


# transformers' own SDPA attention, registered under a second name (see the module docstring).
CAUSAL_SDPA = "yoda_raw_causal_sdpa"
AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)


@contextlib.contextmanager
def causal_attention(model):
    """Run `model`'s SDPA attention as CAUSAL_SDPA inside the block (eager attention stays as it is)."""
    implementation = model.config._attn_implementation
    if implementation != "sdpa":
        yield
        return
    model.set_attn_implementation(CAUSAL_SDPA)
    try:
        yield
    finally:
        model.set_attn_implementation(implementation)  # evaluation and generation mask padding again


class GraphStep:
    """Forward and backward of one (batch_size, max_length) micro-batch as a replayable CUDA graph.

    The eager step's contract (train.EagerStep): `forward_backward` accumulates the gradient of
    (sum of token losses) / n_supervised into the parameters' .grad and returns the sum of the
    micro-batches' token losses. Unlike the eager step it keeps the gradient tensors: the graph
    adds into them at fixed addresses, so the loop zeroes them in place.
    """

    frees_gradients = False

    def __init__(
        self,
        model,
        batch_size: int,
        max_length: int,
        pad_id: int,
        device: torch.device,
        loss_chunk=0,
        offload=None,
    ):
        self.model, self.pad_id, self.loss_chunk = model, pad_id, loss_chunk
        # --offload-activations: its copies to and from host memory are recorded and replayed too.
        self.offload = offload
        # The graph's inputs: ids and labels, filled before every replay; no attention mask (see
        # the module docstring).
        self.batch = {
            "input_ids": torch.full((batch_size, max_length), pad_id, dtype=torch.long, device=device),  # (B, T)
            "labels": torch.full((batch_size, max_length), IGNORE, dtype=torch.long, device=device),  # (B, T)
        }
        self.scale = torch.ones((), device=device)  # 1 / supervised tokens of the step, set each step
        self.warmed_up = False  # the first step runs eagerly (see forward_backward)
        self.graph = None
        self.loss_sum = None  # the graph's output: this micro-batch's summed token loss, (,)

    def forward_backward(self, micro_batches: list[dict], n_supervised: torch.Tensor) -> torch.Tensor:
        self.scale.copy_(1.0 / n_supervised)  # on the device: no sync
        step_loss = torch.zeros((), device=self.scale.device)
        for batch in micro_batches:
            self._load(batch)
            if not self.warmed_up:
                # The first step runs eagerly, on the same padded buffers. It is also the warm-up a
                # capture needs: cuBLAS handles, bitsandbytes' and autograd's lazy set-up, and the
                # gradient tensors themselves exist before recording starts. Out of memory shows
                # here, as in the eager loop, and --auto-batch-size retries as it does there.
                step_loss += self.loss_and_backward().detach()
                continue
            if self.graph is None:
                self._capture_or_clean_up()
            self.graph.replay()  # forward and backward: gradients added into .grad
            step_loss += self.loss_sum  # read before the next replay overwrites it
        self.warmed_up = True
        return step_loss

    def loss_and_backward(self) -> torch.Tensor:
        """Forward and backward of the micro-batch in the buffers: what the warm-up runs and the
        capture records. Returns its summed token loss; gradients go into .grad."""
        # The backward too: its checkpointing recompute runs the layers' forward again.
        with causal_attention(self.model):
            with self.offload or contextlib.nullcontext():
                loss_sum = token_loss_sum(self.model, self.batch, self.loss_chunk)
            (loss_sum * self.scale).backward()
        return loss_sum

    def _load(self, batch: dict) -> None:
        """Copy a micro-batch into the graph's input buffers, padding rows and columns."""
        rows, length = batch["input_ids"].shape
        if (rows, length) != tuple(self.batch["input_ids"].shape):
            self.batch["input_ids"].fill_(self.pad_id)
            self.batch["labels"].fill_(IGNORE)
        self.batch["input_ids"][:rows, :length].copy_(batch["input_ids"])
        self.batch["labels"][:rows, :length].copy_(batch["labels"])

    def _capture_or_clean_up(self) -> None:
        """Capture; on failure (out of memory, above all, which --auto-batch-size answers with a
        smaller batch) drop the half-made graph and the gradients before the error goes up, so the
        retry starts from the memory the eager loop would have."""
        try:
            self._capture()
        except BaseException as err:
            self.graph = self.loss_sum = None
            self.model.zero_grad(set_to_none=True)
            if isinstance(err, torch.OutOfMemoryError):
                # The first step, the same batch without the graph, fit: the caller can say so.
                err.in_graph_capture = True
            raise

    def _capture(self) -> None:
        # The graph records `grad += ...` into the gradient tensors the first step made (the loop
        # zeroes them in place since), which is why they must never be freed afterwards.
        # The capture runs on a stream of its own, whose matmuls get cuBLAS workspaces of their own,
        # kept in the graph's memory: the first step's (the default stream's) would go unused from
        # here on, so they go back first (as torch.compile's own CUDA graphs do).
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            try:
                self.loss_sum = self.loss_and_backward()
            except BaseException:
                # Offloading's copies run on a stream of their own, joined back at the backward's
                # end. An error cuts that short, and CUDA refuses to end a capture with a stream
                # not joined: its error would hide this one (out of memory, which the caller answers).
                if self.offload is not None:
                    self.offload.settle()
                raise
