"""--reuse-dequant: each 4-bit weight dequantized once for the recompute and the backward, not twice.

Why: a 4-bit linear cannot multiply with its packed weight; bitsandbytes dequantizes it to the
compute dtype first, in every forward and again in backward (its `MatMul4Bit.backward` computes
grad_input = grad_output @ dequantize(W)). With gradient checkpointing a layer runs forward twice
(once in the forward pass, once recomputed just before its backward) and backward once: three
dequantizations of every weight a step, a real share of a short step. Keeping the weight the
recompute dequantized until the backward, right after, saves one of the three.

What it costs: one layer's weights in the compute dtype while that layer's backward runs (Phi-3-mini:
113M weights a layer, 0.21 GiB in bf16). Nothing in the first forward: non-reentrant checkpointing
keeps none of what a checkpointed layer saves for backward, it recomputes it. Without checkpointing
every layer's weight would be kept (7.6 GB on Phi-3-mini), so it needs checkpointing on.

--fp8-matmuls on: the same matmul with its two products in FP8 (MatmulDequantizedOnceFP8 below).
Hopper's and Ada's FP8 matmuls have twice bf16's peak, and with checkpointing every frozen weight
takes part in three products a step. Each operand is scaled into e4m3 (3 mantissa bits, largest
448): the input and the output gradient with one scale a token (a row: its largest magnitude onto
448), the weight with one scale for the whole tensor, taken from its 4-bit block scales. One scale a
token lets the kernel that makes each row cast it too, where one scale a tensor needs the whole
tensor's largest value first, and a token with outlier features costs no other token its precision
(faster than one scale a tensor, and closer to bf16's losses). The products err by a few percent
each where bf16's err by a fraction of one, so the losses are no longer SFTTrainer's to the digit; LoRA's own
matmuls and everything else stay in the compute dtype. The dequantized weight is kept in FP8
between the recompute and the backward, half the bf16 copy. On a CUDA GPU the packed weight goes
to e4m3 in one Triton kernel (kernels.py), with no bf16 weight between.
"""

import contextlib
import types

import bitsandbytes as bnb
import torch

from yoda_raw.errors import YodaError
from yoda_raw.model import decoder_layers

E4M3 = torch.float8_e4m3fn


def resolve(setting: str, cuda_graph: str, quant: str, gradient_checkpointing: bool, fp8_matmuls: str = "off") -> str:
    """--reuse-dequant auto|on|off -> "on" or "off". auto follows the CUDA graph, the fast path it
    pays, where the base is 4-bit and checkpointing is on; the eager loop stays plain.
    --fp8-matmuls on runs inside this matmul, so it turns auto on; without checkpointing there is
    no recompute to share with, and FP8's matmul keeps its e4m3 weight for the backward itself.

    >>> resolve("auto", "on", "nf4", True), resolve("auto", "off", "nf4", True), resolve("auto", "on", "none", True)
    ('on', 'off', 'off')
    >>> resolve("auto", "off", "nf4", True, fp8_matmuls="on"), resolve("auto", "on", "nf4", False, fp8_matmuls="on")
    ('on', 'off')
    """
    if fp8_matmuls == "on" and quant != "nf4":
        raise YodaError("--fp8-matmuls on multiplies by the dequantized 4-bit weights: it needs --quant nf4")
    if fp8_matmuls == "on" and setting == "off" and gradient_checkpointing:
        raise YodaError(
            "--fp8-matmuls on runs inside the matmul that --reuse-dequant puts in place; drop --reuse-dequant off"
        )
    if setting == "on" and quant != "nf4":
        raise YodaError("--reuse-dequant on needs a 4-bit base (--quant nf4); use --reuse-dequant off")
    if fp8_matmuls == "on":  # without checkpointing nothing is recomputed: FP8 keeps its own e4m3 weight
        return "on" if gradient_checkpointing else "off"
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


def resolve_fp8(setting: str, fast_path: bool, device: torch.device, skeleton_model) -> str:
    """--fp8-matmuls auto|on|off -> "on" or "off". auto is on where it pays: in the
    fast path (`fast_path`: compiled layers in the CUDA graph, bf16, a 4-bit base, checkpointing) on
    a Hopper GPU (compute capability 9.x), for a model whose decoder linears cuBLAS's FP8 matmul takes
    (sizes multiples of 16); benchmarks/ measures what it gains and how close its losses stay. Off
    elsewhere: Ada GPUs (8.9) have FP8 matmuls but were not measured (`on` asks for them there);
    older GPUs and CPUs have none. `on` on a GPU without FP8 gets one line before the model loads.

    >>> resolve_fp8("auto", True, torch.device("cpu"), None), resolve_fp8("off", True, torch.device("cpu"), None)
    ('off', 'off')
    """
    if setting == "on":
        check_fp8_device(device)
    if setting != "auto":
        return setting
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if not fast_path or capability is None or capability[0] != 9:
        return "off"
    return "off" if odd_sized([m for block in decoder_layers(skeleton_model) for m in block.modules()]) else "on"


def check_fp8_device(device: torch.device) -> None:
    """FP8 matmuls run on GPUs of compute capability 8.9 and later (Ada, Hopper, Blackwell). A CPU
    runs them too, slowly (the tests do); anything else gets one line before the model loads."""
    if device.type == "cpu":
        return
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability is None or capability < (8, 9):
        found = f"compute capability {capability[0]}.{capability[1]}" if capability else f"a {device.type} device"
        raise YodaError(
            f"--fp8-matmuls on needs a GPU with FP8 matmuls (compute capability 8.9 or later: Ada, Hopper); "
            f"this is {found}; use --fp8-matmuls off"
        )


def odd_sized(modules) -> list[torch.nn.Linear]:
    """The linears (4-bit ones too) among `modules` whose sizes cuBLAS's FP8 matmul does not take: it
    takes multiples of 16 (and any number of tokens)."""
    return [m for m in modules if isinstance(m, torch.nn.Linear) and (m.in_features % 16 or m.out_features % 16)]


def to_fp8_rowwise(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor / scale in e4m3, scale of shape (rows, 1)): each row's largest magnitude maps onto
    e4m3's largest, so nothing overflows; `fp8 * scale` gives the row back, rounded. The scales stay
    on the device: no host sync."""
    amax = tensor.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / torch.finfo(E4M3).max
    return (tensor.float() / scale).to(E4M3), scale


def block_scales(quant_state) -> torch.Tensor:
    """A 4-bit weight's block scales (absmax, one a block of 64 values) in fp32. Where they are
    themselves quantized (double quantization: 8 bits, one fp32 scale a block of 256, plus an offset)
    they are dequantized first: 1/64 of the weight's size."""
    absmax = quant_state.absmax
    if quant_state.nested:
        absmax = bnb.functional.dequantize_blockwise(absmax, quant_state.state2) + quant_state.offset
    return absmax.float()


def dequantized_in_fp32(packed, absmax, blocksize: int, rows: int, columns: int) -> torch.Tensor:
    """bitsandbytes' dequantization of a packed NF4 weight to fp32, (rows, columns), from its block
    scales already in fp32 (block_scales): every value its 16-value code times its block's scale."""
    state = bnb.functional.QuantState(
        absmax=absmax, shape=torch.Size((rows, columns)), dtype=torch.float32, blocksize=blocksize, quant_type="nf4"
    )
    return bnb.functional.dequantize_4bit(packed, state)


@torch.library.custom_op("yoda_raw::nf4_to_e4m3", mutates_args=())
def nf4_to_e4m3(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, inverse_scale: torch.Tensor, blocksize: int,
    rows: int, columns: int,
) -> torch.Tensor:  # fmt: skip
    """The packed 4-bit weight, dequantized and multiplied by `inverse_scale`, in e4m3: (rows,
    columns). A custom op, so that torch.compile calls it as it is; here through bitsandbytes'
    dequantization to fp32 (which knows NF4's `code`), on CUDA kernels.py's Triton kernel in one pass
    (registered below, which says why)."""
    return (dequantized_in_fp32(packed, absmax, blocksize, rows, columns) * inverse_scale).to(E4M3)


@nf4_to_e4m3.register_fake
def _(packed, absmax, code, inverse_scale, blocksize, rows, columns):
    return packed.new_empty((rows, columns), dtype=E4M3)


@nf4_to_e4m3.register_kernel("cuda")
def _(packed, absmax, code, inverse_scale, blocksize, rows, columns):
    from yoda_raw.fast import kernels  # Triton: torch's CUDA builds have it, CPU ones need not

    out = torch.empty(rows, columns, dtype=E4M3, device=packed.device)
    return kernels.nf4_to_e4m3(packed, absmax, code, inverse_scale, blocksize, out)


def weight_in_e4m3(packed_weight, quant_state) -> tuple[torch.Tensor, torch.Tensor]:
    """(W in e4m3, its one scale), W (out, in). The scale needs no pass over W: every value is a
    16-value code times its block's scale, and NF4's code spans -1 to 1, so W's largest magnitude is
    the largest block scale."""
    absmax = block_scales(quant_state)
    scale = absmax.max().clamp(min=1e-12) / torch.finfo(E4M3).max
    rows, columns = quant_state.shape
    code = quant_state.code.float()
    return nf4_to_e4m3(packed_weight, absmax, code, 1 / scale, quant_state.blocksize, rows, columns), scale


def fp8_product(a8, a_scales, b8_t, b_scale) -> torch.Tensor:
    """(a8 * a_scales) @ (b8_t * b_scale).T in bf16: a row-wise scaled matmul, one scale a row of a,
    b's one scale repeated for each of its rows. torch._scaled_mm wants its first operand row-major
    and its second column-major: b8_t is a row-major (n, k) tensor, so b8_t.t() is. Its row-wise
    form gives bf16 only."""
    b_scales = b_scale.reshape(1, 1).expand(1, b8_t.shape[0]).contiguous()
    return torch._scaled_mm(a8, b8_t.t(), scale_a=a_scales, scale_b=b_scales, out_dtype=torch.bfloat16)


class MatmulDequantizedOnceFP8(torch.autograd.Function):
    """MatmulDequantizedOnce with both products in FP8: the weight dequantized and cast to e4m3 once
    and kept for the backward; the input cast in forward, the output gradient in backward, each
    token with its own scale. `w8` and `w_scale`, where given, are the weight already cast (SharedE4M3)."""

    @staticmethod
    def forward(ctx, x, packed_weight, quant_state, w8=None, w_scale=None):
        if w8 is None:
            w8, w_scale = weight_in_e4m3(packed_weight, quant_state)
        x8, x_scales = to_fp8_rowwise(x.reshape(-1, x.shape[-1]))
        ctx.save_for_backward(w8, w_scale)
        out = fp8_product(x8, x_scales, w8, w_scale).to(x.dtype)
        return out.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_output):
        w8, w_scale = ctx.saved_tensors
        g8, g_scales = to_fp8_rowwise(grad_output.reshape(-1, grad_output.shape[-1]))
        # grad_input = G @ W: W's transpose as the row-major (in, out) operand, one copy a backward.
        grad = fp8_product(g8, g_scales, w8.t().contiguous(), w_scale).to(grad_output.dtype)
        return grad.reshape(*grad_output.shape[:-1], -1), None, None, None, None


def linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' Linear4bit.forward for training (compute dtype, bias, output in the input's
    dtype) through the linear's `dequantized_matmul`. Without gradients (evaluation, the end-of-run
    samples) there is no backward to share with, and bitsandbytes' own forward has a faster kernel
    for one token at a time: those stay in the compute dtype, FP8 or not."""
    if not torch.is_grad_enabled():
        return bnb.nn.Linear4bit.forward(self, x)
    dtype = self.compute_dtype or x.dtype
    if self.e4m3 is not None:  # cast already, once for all the chunks of this layer's MLP (SharedE4M3)
        out = MatmulDequantizedOnceFP8.apply(x.to(dtype), self.weight, self.weight.quant_state, *self.e4m3)
    else:
        out = self.dequantized_matmul.apply(x.to(dtype), self.weight, self.weight.quant_state)
    if self.bias is not None:
        out = out + self.bias.to(dtype)
    return out.to(x.dtype)


def reuse_dequantized_weights(model, fp8: bool = False) -> int:
    """Give every 4-bit linear of the checkpointed decoder layers (of every decoder layer with `fp8`)
    the forward above, with its products in FP8 if `fp8`; returns how many there were. A layer left out of checkpointing
    (--uncheckpointed-layers) keeps bitsandbytes' own in the compute dtype: there the dequantized
    weight would be kept from the forward to the backward (0.21 GiB a Phi-3-mini layer in bf16). With
    FP8 those layers take the FP8 matmul too: its e4m3 weight, kept from the forward to the backward,
    is half that, and its products are FP8's."""
    linears = [
        module
        for block in decoder_layers(model)
        if block.gradient_checkpointing or fp8
        for module in block.modules()
        if isinstance(module, bnb.nn.Linear4bit)
    ]
    if fp8:
        odd = odd_sized(linears)
        if odd:
            raise YodaError(
                f"--fp8-matmuls on needs every 4-bit linear's sizes to be multiples of 16; "
                f"{len(odd)} of {len(linears)} are not (the first is {odd[0].in_features} -> {odd[0].out_features}); "
                f"use --fp8-matmuls off"
            )
    for linear in linears:
        # One function and one class for every layer: torch.compile guards on them, and an object of
        # each layer's own (a functools.partial) would compile every layer again, up to its limit.
        linear.forward = types.MethodType(linear4bit_forward, linear)
        linear.dequantized_matmul = MatmulDequantizedOnceFP8 if fp8 else MatmulDequantizedOnce
        linear.e4m3 = None  # SharedE4M3's cast, while a chunked MLP's chunks run
    return len(linears)


class SharedE4M3:
    """--mlp-chunk with FP8 matmuls: one layer's MLP weights cast to e4m3 once for all its chunks.

    Each chunk of a split layer's MLP is a checkpoint of its own (halves.py), and its matmuls would
    each cast their 4-bit weight to e4m3 for themselves: once a chunk in the forward and once a chunk
    in the recompute, where the unchunked MLP casts once in each. Here the forward's cast is made
    before its chunks and dropped after them, and the recompute's is made by the first chunk the
    backward recomputes and dropped after the last, whose checkpoint keeps what its backward needs.
    So nothing more is held than a chunk holds anyway, and the casts are the unchunked MLP's.
    (The transpose each chunk's backward makes of the e4m3 weight stays a chunk's: the forward and
    the recompute must save the same tensors, and the forward has no backward to make it for.)"""

    def __init__(self, linears: list):
        self.linears = linears

    @contextlib.contextmanager
    def forward_chunks(self):
        """Around the forward's chunks: one cast for them all, let go after them (after an error too:
        an out-of-memory retry holds nothing into its next try)."""
        self._make()
        try:
            yield
        finally:
            self._drop()

    @contextlib.contextmanager
    def chunk(self, first: bool):
        """Around each chunk's call, forward and recompute. In the forward the cast is there already;
        in the backward its first recompute makes it, and the last (the first chunk's: the backward
        runs the chunks in reverse) lets it go, its checkpoint keeping what its backward needs. Let
        go in a `finally`: checkpointing stops a recompute early once it has what the backward needs."""
        if self.linears[0].e4m3 is None:
            self._make()
        try:
            yield
        finally:
            if first and torch._C._current_graph_task_id() != -1:  # in the backward: this was its recompute
                self._drop()

    def _make(self) -> None:
        for linear in self.linears:
            linear.e4m3 = weight_in_e4m3(linear.weight, linear.weight.quant_state)

    def _drop(self) -> None:
        for linear in self.linears:
            linear.e4m3 = None


def share_between_chunks(model) -> int:
    """Give every split layer whose MLP runs in chunks (halves.py) a SharedE4M3 for its MLP's 4-bit
    linears, which reuse_dequantized_weights(fp8=True) made FP8 first; returns how many layers."""
    shared = 0
    for layer in decoder_layers(model):
        if getattr(layer, "halves", None) and layer.mlp_chunk:
            mlp_half = layer.halves[1]
            mlp_half.shared_weights = SharedE4M3([m for m in mlp_half.modules() if isinstance(m, bnb.nn.Linear4bit)])
            shared += 1
    return shared
