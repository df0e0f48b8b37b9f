"""--split-layers: each decoder layer checkpointed as two halves, its attention and its MLP.

Gradient checkpointing keeps a decoder layer's input and recomputes the layer just before its
backward. The recompute makes everything the backward of the whole layer needs, at once: the
attention's products (at 16 rows of 512 tokens on Phi-3-mini, the qkv product alone is 144 MiB) stay
alive through the MLP's backward, which comes first and is the step's peak (its gate_up product
and gradient, 256 MiB each). Checkpointing each half on its own recomputes the attention only once
the MLP's backward is done, so the two halves' products are never alive together:

    h = x + attention(input_layernorm(x))            checkpoint 1 keeps x
    y = h + mlp(post_attention_layernorm(h))         checkpoint 2 keeps h

What it costs: the residual stream between the halves, h, is kept too: a second (B, T, H) tensor a
layer (48 MiB at 16 x 512), which --offload-activations moves to host memory with the first. The
arithmetic is the layer's own, in the same order: the same numbers.

With --compile-layers the halves are compiled each on its own (fast/compile.py), inside the
checkpoints: within one compiled layer torch's partitioner would recompute the attention half to
get h rather than keep it, and hold its products through the MLP's backward again.

--mlp-chunk N goes one step further inside the MLP half: the MLP works token by token, so its
checkpoint can be N tokens at a time, each chunk a checkpoint of its own. The backward then
recomputes one chunk, runs its backward and frees its products before the next chunk's recompute:
the MLP's wide products (gate_up's output and its gradient, the activation's) are a chunk's, not
the whole micro-batch's. What it costs: more, smaller matmuls, and each chunk dequantizes the 4-bit
weights again (once in the forward, once in the recompute), except where the fast path's FP8
matmuls cast them once for all of a layer's chunks (`shared_weights`, fast/dequant.py).

The halves are written for the decoder layers of Llama, Mistral, Qwen2 and Phi-3 (transformers'
`input_layernorm`, `self_attn`, `post_attention_layernorm`, `mlp`, and Phi-3's residual dropouts);
another layout is refused at start. Evaluation and generation run the layer as it is (with its KV
cache).
"""

import contextlib
import types

import torch
from torch.utils.checkpoint import checkpoint

from yoda_raw.errors import YodaError
from yoda_raw.model import decoder_layers

PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
# Modules a layer may hold besides PARTS: Phi-3's dropouts on each half's output (p = 0 in its config).
DROPOUTS = ("resid_attn_dropout", "resid_mlp_dropout")


class AttentionHalf(torch.nn.Module):
    """x -> attention(input_layernorm(x)): what the first half adds to the residual stream."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.norm, self.attention = layer.input_layernorm, layer.self_attn
        self.dropout = getattr(layer, "resid_attn_dropout", torch.nn.Identity())

    def forward(self, hidden: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        out, _ = self.attention(hidden_states=self.norm(hidden), **attention_kwargs)
        return self.dropout(out)


class MLPHalf(torch.nn.Module):
    """h -> mlp(post_attention_layernorm(h)): what the second half adds to the residual stream."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.norm, self.mlp = layer.post_attention_layernorm, layer.mlp
        self.dropout = getattr(layer, "resid_mlp_dropout", torch.nn.Identity())
        self.shared_weights = None  # with FP8 matmuls, the weights its chunks share (fast/dequant.py)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp(self.norm(hidden)))


def check_layout(skeleton_model) -> None:
    """Refuse, before any weights load, a model whose decoder layers are not laid out as PARTS."""
    for layer in decoder_layers(skeleton_model):
        children = {name for name, _ in layer.named_children()}
        missing, extra = set(PARTS) - children, children - set(PARTS) - set(DROPOUTS)
        if missing or extra:
            raise YodaError(
                f"--split-layers on knows decoder layers made of {', '.join(PARTS)}; "
                f"{type(layer).__name__} has {', '.join(sorted(children))}; use --split-layers off"
            )


def split_layers(model, mlp_chunk: int = 0) -> None:
    """Every checkpointed decoder layer of `model` runs as two checkpointed halves in training, the
    MLP's `mlp_chunk` tokens at a time (0: all at once). The halves are kept on the layer outside its
    modules (`layer.halves`, a tuple): the weights keep their names, and an adapter saved from the
    model is the same."""
    for layer in decoder_layers(model):
        if layer.gradient_checkpointing:  # --uncheckpointed-layers leaves the last ones whole
            layer.halves = (AttentionHalf(layer), MLPHalf(layer))  # a tuple: not registered as modules
            layer.mlp_chunk = mlp_chunk
            layer.forward = types.MethodType(_split_forward, layer)
            # The halves are the layer's checkpoints: its own must let them through. transformers
            # checkpoints a layer around its class's forward (which the line above steps past) or,
            # in older versions (5.17 among them), around its call, whatever its forward: the
            # halves would then run inside that checkpoint, and each three times a step, not two.
            layer._gradient_checkpointing_func = _as_it_is


def _as_it_is(function, *args):
    """The layer's checkpointing function where the halves checkpoint themselves: none."""
    return function(*args)


def _split_forward(layer, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # Out of training, or called in a way the halves do not know (more than the hidden states by
    # position), the layer runs as it is, its cache included.
    if not (layer.training and torch.is_grad_enabled()) or args:
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    # Training keeps no KV cache (the layer's own checkpointing drops it the same way).
    for name in ("cache", "past_key_values", "use_cache", "layer_past"):
        kwargs.pop(name, None)
    attention, mlp = layer.halves
    hidden = hidden_states + checkpoint(attention, hidden_states, use_reentrant=False, **kwargs)
    return _mlp_in_chunks(mlp, hidden, layer.mlp_chunk)


def _mlp_in_chunks(mlp: MLPHalf, hidden: torch.Tensor, chunk: int) -> torch.Tensor:
    """hidden + the MLP half of (B, T, H) `hidden`, checkpointed `chunk` tokens at a time (0: at once)."""
    if chunk == 0 or chunk >= hidden.shape[0] * hidden.shape[1]:
        return hidden + checkpoint(mlp, hidden, use_reentrant=False)
    # The rows laid end to end, (1, B x T, H): a chunk is then a contiguous slice, whatever B and T.
    # Each chunk adds its own residual, so no whole (B, T, H) MLP output is made only to be added.
    tokens = hidden.reshape(1, -1, hidden.shape[-1])
    with mlp.shared_weights.forward_chunks() if mlp.shared_weights else contextlib.nullcontext():
        pieces = tokens.split(chunk, dim=1)
        outputs = [
            piece + checkpoint(_chunk, mlp, piece, i == 0, use_reentrant=False) for i, piece in enumerate(pieces)
        ]
    return torch.cat(outputs, dim=1).view_as(hidden)


def _chunk(mlp: MLPHalf, piece: torch.Tensor, first: bool) -> torch.Tensor:
    """One chunk of the MLP half (the first of the forward's, or not), inside what the fast path
    shares between the chunks where it does (fast/dequant.py's SharedE4M3 says when it lives)."""
    with mlp.shared_weights.chunk(first) if mlp.shared_weights else contextlib.nullcontext():
        return mlp(piece)


def compile_units(model) -> list[torch.nn.Module]:
    """What --compile-layers compiles: each decoder layer, or, where it is split, its two halves."""
    units = []
    for layer in decoder_layers(model):
        units += list(getattr(layer, "halves", None) or [layer])
    return units
