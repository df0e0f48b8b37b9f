"""--split-layers: each decoder layer checkpointed as two halves, attention and MLP (halves.py)."""

import collections
import functools
import json

import pytest
import torch
import torch._dynamo
from conftest import assert_close_up_to_rounding, rounding_tolerance

from benchmarks.lab.live_peak import LivePeak
from tests.common import batch_of, metrics, refused_in_one_line, with_trained_lora
from yoda_raw import halves
from yoda_raw.errors import YodaError
from yoda_raw.loss import token_loss_sum
from yoda_raw.model import decoder_layers


def step(model, batch, seed: int, count_runs: bool = True):
    """One forward and backward: (loss, LoRA gradients, the shapes of what the forward saved outside
    the checkpoints, how often each layer's attention and MLP ran, where `count_runs`)."""
    runs = {"attention": 0, "mlp": 0}
    for layer in decoder_layers(model) if count_runs else []:
        for part, module in (("attention", layer.self_attn), ("mlp", layer.mlp)):
            # Wrapped on the instance: module hooks do not fire in checkpointing's recompute.
            module.forward = lambda *a, part=part, forward=module.forward, **k: (
                runs.__setitem__(part, runs[part] + 1) or forward(*a, **k)
            )
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved.append(tuple(tensor.shape))
        return tensor

    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # LoRA dropout's masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = token_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved, runs


def test_split_layers_train_as_whole_layers_keeping_the_middle(tiny_tokenizer, tiny_qlora):
    """The same loss and LoRA gradients, to the bit, as whole checkpointed layers, dropout masks
    included: the halves do the layer's own arithmetic in its order. The forward keeps one more
    (B, T, H) tensor a layer (the residual stream between the halves), and each half runs twice
    (forward, recompute). Catches a residual added twice or not at all, a norm or dropout skipped, a
    half left outside its checkpoint (nothing recomputed) or the split not applied."""
    batch = batch_of(tiny_tokenizer)
    whole = with_trained_lora(tiny_qlora(lora_dropout=0.1))
    split = with_trained_lora(tiny_qlora(lora_dropout=0.1))
    halves.split_layers(split)
    loss, grads, saved, runs = step(whole, batch, seed=7)
    split_loss, split_grads, split_saved, split_runs = step(split, batch, seed=7)
    assert torch.equal(split_loss, loss)
    assert split_grads.keys() == grads.keys() and grads
    for name in grads:
        assert torch.equal(split_grads[name], grads[name]), name
    hidden = (*batch["input_ids"].shape, whole.config.hidden_size)
    layers = len(decoder_layers(whole))
    assert split_saved.count(hidden) == saved.count(hidden) + layers
    assert runs == split_runs == {"attention": 2 * layers, "mlp": 2 * layers}


def checkpointed_around_the_call(layer) -> None:
    """`layer` checkpointed as transformers 5.17 and others before it do: around its call (newer
    versions checkpoint around the class's forward)."""

    class AroundTheCall(type(layer)):
        def __call__(self, *args, **kwargs):
            if self.gradient_checkpointing and self.training:
                call = functools.partial(torch.nn.Module.__call__, self, **kwargs)
                return self._gradient_checkpointing_func(call, *args)
            return torch.nn.Module.__call__(self, *args, **kwargs)

    layer.__class__ = AroundTheCall


@pytest.mark.parametrize("chunk", [0, 10])
def test_the_halves_are_the_only_checkpoints_whatever_transformers_wraps(tiny_tokenizer, tiny_qlora, chunk):
    """Where transformers checkpoints a layer around its call, the split layer's halves must not run
    inside that checkpoint too: each half twice a step (forward, recompute), not three times (the
    outer recompute, then the halves' own), and the residual stream between them kept. Catches the
    layer's own checkpoint left on: a quarter more of the layers' work (five passes of a layer's
    cost instead of four, its backward counting two), for no memory."""
    batch = batch_of(tiny_tokenizer)
    model = with_trained_lora(tiny_qlora(lora_dropout=0.0))
    for layer in decoder_layers(model):
        checkpointed_around_the_call(layer)
    halves.split_layers(model, mlp_chunk=chunk)
    _, grads, saved, runs = step(model, batch, seed=0)
    layers, hidden = len(decoder_layers(model)), (*batch["input_ids"].shape, model.config.hidden_size)
    chunks = 1 if chunk == 0 else 5  # 48 tokens: four chunks of 10 and one of 8
    assert runs == {"attention": 2 * layers, "mlp": 2 * chunks * layers}
    assert grads
    if chunk == 0:  # the middle, kept by the MLP half's checkpoint and not by an outer one
        whole_layers = with_trained_lora(tiny_qlora(lora_dropout=0.0))
        _, _, whole_saved, _ = step(whole_layers, batch, seed=0)
        assert saved.count(hidden) == whole_saved.count(hidden) + layers


def test_mlp_chunks_give_the_whole_mlps_gradients_a_chunk_at_a_time(tiny_tokenizer, tiny_qlora):
    """--mlp-chunk: the MLP half runs on at most `chunk` tokens at a time, forward and recompute
    alike, each chunk its own checkpoint (it keeps its slice of the residual stream, and nothing of
    the whole), with the loss and gradients of the unchunked split. 48 tokens in chunks of 10: four
    of 10 and a last of 8. Catches chunks left out or taken twice, one checkpoint over all chunks
    (the recompute would hold every chunk's products again), or rows and tokens mixed up."""
    batch = batch_of(tiny_tokenizer)
    whole = with_trained_lora(tiny_qlora(lora_dropout=0.0))
    chunked = with_trained_lora(tiny_qlora(lora_dropout=0.0))
    halves.split_layers(whole)
    halves.split_layers(chunked, mlp_chunk=10)
    seen = []
    for layer in decoder_layers(chunked):
        layer.mlp.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    loss, grads, saved, runs = step(whole, batch, seed=0)
    chunked_loss, chunked_grads, chunked_saved, chunked_runs = step(chunked, batch, seed=0)
    layers, width = len(decoder_layers(chunked)), chunked.config.hidden_size
    hidden = (*batch["input_ids"].shape, width)
    assert chunked_runs == {"attention": 2 * layers, "mlp": 2 * 5 * layers}
    # Forward and recompute, each chunk once in each: never the whole 48 tokens.
    assert sorted(collections.Counter(seen).items()) == [((1, 8, width), 2 * layers), ((1, 10, width), 8 * layers)]
    assert chunked_saved.count(hidden) == saved.count(hidden) - layers
    assert chunked_saved.count((1, 10, width)) == 4 * layers and chunked_saved.count((1, 8, width)) == layers
    # The same sums over fewer rows at a time: a matmul may block them otherwise, so equal up to fp32
    # rounding of the tiny model's step (conftest, 7.2e-5 of each tensor's size).
    assert_close_up_to_rounding(chunked_loss, loss, name="loss sum")
    assert chunked_grads.keys() == grads.keys() and grads
    for name in grads:
        assert_close_up_to_rounding(chunked_grads[name], grads[name], name=name)


def test_chunks_share_one_fp8_cast_of_the_mlps_weights(tiny_tokenizer, tiny_qlora, monkeypatch):
    """--mlp-chunk with FP8 matmuls (fast/dequant.py's SharedE4M3): each MLP weight is cast to e4m3
    once in the forward and once in the recompute, as without chunks, not once a chunk; the loss and
    gradients are those of a cast a chunk exactly (the same e4m3 weights in the same products); and
    after the step no layer holds a cast (on Phi-3-mini, 75 MiB a layer). Catches a cast a chunk, a
    cast never let go, or a chunk given another layer's weights."""
    from bitsandbytes.nn import Linear4bit

    from yoda_raw.fast import dequant

    batch = batch_of(tiny_tokenizer)
    casts = collections.Counter()
    cast = dequant.weight_in_e4m3

    def counted(packed, quant_state):
        casts[packed.data_ptr()] += 1
        return cast(packed, quant_state)

    monkeypatch.setattr(dequant, "weight_in_e4m3", counted)
    results = {}
    for shared in (False, True):
        model = with_trained_lora(tiny_qlora(lora_dropout=0.0))
        halves.split_layers(model, mlp_chunk=10)  # 48 tokens: five chunks
        dequant.reuse_dequantized_weights(model, fp8=True)
        if shared:
            assert dequant.share_between_chunks(model) == len(decoder_layers(model))
        casts.clear()
        loss, grads, _, _ = step(model, batch, seed=0)
        linears = [m for layer in decoder_layers(model) for m in layer.mlp.modules() if isinstance(m, Linear4bit)]
        assert linears and all(linear.e4m3 is None for linear in linears), "a cast held after the step"
        results[shared] = loss, grads, [casts[linear.weight.data_ptr()] for linear in linears]
    (loss, grads, each_chunk), (shared_loss, shared_grads, once) = results[False], results[True]
    assert each_chunk == [2 * 5] * len(linears) and once == [2] * len(linears)
    assert torch.equal(shared_loss, loss) and shared_grads.keys() == grads.keys() and grads
    for name in grads:
        assert torch.equal(shared_grads[name], grads[name]), name


@pytest.mark.parametrize("fp8, chunk", [("on", 10), ("off", 10), ("on", 0)])
def test_the_fast_path_shares_the_cast_where_fp8_meets_chunks(tiny_qlora, fp8, chunk):
    """fast.apply gives a split layer's MLP half its shared weights where FP8 matmuls meet
    --mlp-chunk, and only there: without FP8 the chunks' matmuls have no e4m3 weights to share, and
    without chunks there is one cast a pass anyway."""
    from yoda_raw import fast

    model = tiny_qlora(lora_dropout=0.0)
    halves.split_layers(model, mlp_chunk=chunk)
    fast.apply(fast.Plan("off", "off", "on", fp8, "off"), model)
    shared = [layer.halves[1].shared_weights for layer in decoder_layers(model)]
    assert all(s is not None for s in shared) if (fp8, chunk) == ("on", 10) else shared == [None] * len(shared)


def test_the_split_and_the_chunks_lower_the_steps_peak():
    """What the levers are for: the peak of a step's live tensors (counted by the lab's
    live_peak.py, which measures the same at the real widths). A Phi-3 layout with a wide MLP
    (512 of the MLP's width a token against 64 of the hidden size, Phi-3-mini's proportion being
    8,192 to 3,072), fp32, 2,048 tokens. The split frees the attention's products before the MLP's
    backward: at least the qkv product (2,048 x 192 x 4 bytes) less. Chunks of 256 tokens hold an
    eighth of the MLP's products: at least two of gate_up's whole outputs (its output and that
    output's gradient, 2,048 x 1,024 x 4 bytes each) less seven eighths. Catches the halves or the
    chunks under one checkpoint (the recompute holds it all again), which leave the peak as it was."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=64, hidden_size=64, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    ids = torch.randint(1, 64, (8, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    peaks = {}
    for name, chunk in (("whole", None), ("split", 0), ("chunks", 256)):
        torch.manual_seed(0)
        model = Phi3ForCausalLM(config)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if chunk is not None:
            halves.split_layers(model, mlp_chunk=chunk)
        with LivePeak() as counter:
            token_loss_sum(model, batch).backward()
        peaks[name] = counter.peak
    tokens = ids.numel()
    assert peaks["split"] <= peaks["whole"] - tokens * 3 * config.hidden_size * 4
    assert peaks["chunks"] <= peaks["split"] - 2 * tokens * 2 * config.intermediate_size * 4 * 7 / 8


def test_uncheckpointed_layers_stay_whole(tiny_qlora):
    model = tiny_qlora(uncheckpointed_layers=1)
    halves.split_layers(model)
    first, last = decoder_layers(model)
    assert hasattr(first, "halves") and not hasattr(last, "halves")
    assert halves.compile_units(model) == [*first.halves, last]


def test_evaluation_and_generation_run_the_layers_as_they_are(tiny_tokenizer, tiny_qlora):
    """Out of training the layer runs whole, KV cache included: the same logits and the same
    generated tokens; and the weights keep their names (a saved adapter is the same). Catches the
    split forward dropping the cache in generation, or the halves registered as modules."""
    whole, split = with_trained_lora(tiny_qlora()), with_trained_lora(tiny_qlora())
    names = list(split.state_dict())
    halves.split_layers(split)
    assert list(split.state_dict()) == names
    ids = batch_of(tiny_tokenizer)["input_ids"][:1]
    whole.eval(), split.eval()
    with torch.no_grad():
        assert torch.equal(split(input_ids=ids).logits, whole(input_ids=ids).logits)
        settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tiny_tokenizer.pad_token_id}
        assert torch.equal(split.generate(input_ids=ids, **settings), whole.generate(input_ids=ids, **settings))


@pytest.mark.slow  # compiles both halves with inductor: eight seconds on 2 cores
def test_compiled_halves_give_the_eager_gradients_with_one_code_for_all_layers(tiny_tokenizer, tiny_qlora):
    """--compile-layers with --split-layers compiles the halves: one code for every layer's attention
    half and one for every MLP half and chunk (--mlp-chunk 24: two of the 48 tokens; no recompiling
    per layer or chunk), and the loss and gradients of the eager whole layers. No dropout: compiled
    dropout draws other masks."""
    from yoda_raw.fast.compile import compile_layers

    batch = batch_of(tiny_tokenizer)
    eager = with_trained_lora(tiny_qlora(lora_dropout=0.0))
    compiled = with_trained_lora(tiny_qlora(lora_dropout=0.0))
    halves.split_layers(compiled, mlp_chunk=24)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compile_layers(compiled)
        loss, grads, _, _ = step(eager, batch, seed=0)
        # Not counting runs: a wrapper a layer would be code of its own to compile, each layer's.
        compiled_loss, compiled_grads, _, _ = step(compiled, batch, seed=0, count_runs=False)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
    # The same sums, fused by inductor into other kernels: equal up to fp32 rounding of the tiny
    # model's step (conftest, 7.2e-5 of each tensor's size).
    assert_close_up_to_rounding(compiled_loss, loss, name="loss sum")
    for name in grads:
        assert_close_up_to_rounding(compiled_grads[name], grads[name], name=name)


@pytest.mark.slow  # compiles both halves with inductor, FP8 products included: a quarter of a minute on 2 cores
def test_compiled_chunks_share_the_fp8_cast_with_one_code_for_all_layers(tiny_tokenizer, tiny_qlora):
    """The GPU's form of the shared cast: compiled halves read the chunks' e4m3 weights from their
    linears. One code for every layer's MLP half and chunk in the forward and the recompute (the
    weights are inputs of the compiled code, not constants of it: a recompile per layer would fall
    back to eager past torch's limit), and the eager shared run's loss and gradients."""
    from yoda_raw.fast import dequant
    from yoda_raw.fast.compile import compile_layers

    batch = batch_of(tiny_tokenizer)
    models = []
    for _ in range(2):
        model = with_trained_lora(tiny_qlora(lora_dropout=0.0))
        halves.split_layers(model, mlp_chunk=24)
        dequant.reuse_dequantized_weights(model, fp8=True)
        dequant.share_between_chunks(model)
        models.append(model)
    eager, compiled = models
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compile_layers(compiled)
        loss, grads, _, _ = step(eager, batch, seed=0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled_loss, compiled_grads, _, _ = step(compiled, batch, seed=0, count_runs=False)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    finally:
        torch._dynamo.reset()
    # Inductor computes the values cast to e4m3 in other fp32 orders, and a value that lands on the
    # other side of an e4m3 rounding boundary (3 mantissa bits) moves by up to an eighth: a few such
    # elements move the loss by far less than 0.1% and a gradient by far less than 1%, on any CPU. A
    # layer given another layer's weights, or no weights made, is off by the whole of them.
    assert abs(compiled_loss - loss) <= 1e-3 * abs(loss)
    for name in grads:
        assert (compiled_grads[name] - grads[name]).norm() <= 1e-2 * grads[name].norm(), name


def test_a_run_with_split_layers_logs_the_same_losses(tmp_path, tiny_config):
    """The loop with --split-layers on trains as with off, to the logged digit, and the saved config
    says which ran. Catches the option not reaching the model."""
    from yoda_raw import train

    losses = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        options = {"max_steps": 3, "logging_steps": 1, "samples": False, "eval_fraction": 0.0, "lora_dropout": 0.1}
        train.main(tiny_config(options, split_layers=setting, output_dir=str(out)))
        losses[setting] = [record["loss"] for record in metrics(out)]
        assert json.loads((out / "run_config.json").read_text())["split_layers"] == setting
    assert losses["on"] == losses["off"]


def test_a_run_with_mlp_chunks_logs_the_unchunked_losses(tmp_path, tiny_config, monkeypatch):
    """The loop with --mlp-chunk trains as the unchunked split, and the saved config says which
    chunk ran. Catches the option not reaching the layers (spied on: the chunks the MLP half makes)."""
    from yoda_raw import train

    sizes = []
    real = halves._mlp_in_chunks
    monkeypatch.setattr(
        halves, "_mlp_in_chunks", lambda mlp, hidden, chunk: sizes.append(chunk) or real(mlp, hidden, chunk)
    )
    losses = {}
    for chunk in (0, 100):
        out = tmp_path / str(chunk)
        options = {"max_steps": 3, "logging_steps": 1, "samples": False, "eval_fraction": 0.0, "lora_dropout": 0.0}
        train.main(tiny_config(options, split_layers="on", mlp_chunk=chunk, output_dir=str(out)))
        losses[chunk] = [record["loss"] for record in metrics(out)]
        assert json.loads((out / "run_config.json").read_text())["mlp_chunk"] == chunk
    assert set(sizes) == {0, 100}
    # Three steps from the same start, the sums blocked otherwise: fp32 rounding of the tiny model's
    # step, once a step (conftest); a chunk lost or taken twice moves the loss by percents.
    assert losses[100] == pytest.approx(losses[0], rel=0, abs=rounding_tolerance(max(losses[0]), steps=3))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["--split-layers", "on", "--no-gradient-checkpointing"],
            "--split-layers on checkpoints each layer as two halves, and --no-gradient-checkpointing turns "
            "checkpointing off; drop one of them",
        ),
        (
            ["--mlp-chunk", "256"],
            "--mlp-chunk 256 checkpoints the MLP half of each split layer in chunks, and the layers are not split; "
            "add --split-layers on, or drop --mlp-chunk",
        ),
        (["--split-layers", "on", "--mlp-chunk", "-1"], "--mlp-chunk must be 0 (no chunks) or more tokens, got -1"),
    ],
)
def test_split_layers_where_it_cannot_work_is_one_line(tmp_path, capsys, argv, expected):
    """Each refusal one line, exit 2, nothing written: checkpointing off leaves nothing to split, a
    chunk without the split would do nothing, and a negative chunk is no size."""
    assert refused_in_one_line(["--preset", "tiny", *argv], tmp_path / "run", capsys) == f"error: {expected}"


@pytest.mark.parametrize("index", [0, -1])
def test_a_layer_of_another_layout_is_refused(tiny_model, index):
    """A decoder layer with parts the halves do not know (Gemma's extra norms, say) is refused by
    name before any weights load, instead of being split wrong: the first layer, or a later one
    (models that mix layer kinds)."""
    layer = decoder_layers(tiny_model)[index]
    layer.pre_feedforward_layernorm = torch.nn.Identity()
    with pytest.raises(YodaError, match=r"^--split-layers on knows decoder layers made of .*Phi3DecoderLayer has"):
        halves.check_layout(tiny_model)
