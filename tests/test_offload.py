"""--offload-activations: what the forward saves for the backward waits in host memory.

On a CPU the offloader runs the same bookkeeping with plain copies (the GPU's streams and pinned
buffers are tests/test_gpu.py's): these tests check that the backward gets back exactly what the
forward saved, in any order and after a step cut short, and that weights are never moved.
"""

import contextlib
import gc
import weakref

import pytest
import torch
from test_loss import rows_batch

from yoda_raw.errors import YodaError
from yoda_raw.loss import token_loss_sum
from yoda_raw.model import add_lora, decoder_layers, final_norm
from yoda_raw.offload import OffloadActivations

CPU = torch.device("cpu")


@pytest.fixture
def lora_model(tiny_model, tiny_config):
    """The tiny model with LoRA and gradient checkpointing, as the loop trains it."""
    model = add_lora(tiny_model, tiny_config())
    model.train()
    return model


def loss_and_grads(model, batch, offload=None, chunk=0) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    with offload or contextlib.nullcontext():
        value = token_loss_sum(model, batch, chunk)
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_collected(offloader: weakref.ref) -> None:
    """Once the run drops its offloader (an --auto-batch-size retry makes a new one), nothing on the
    model may keep it, or its host buffers, alive."""
    gc.collect()  # a traceback an error left holds the offloader in a cycle until collected
    assert offloader() is None, "the model still holds the offloader (a hook of its left behind?)"


def assert_same(actual, expected):
    loss, grads = actual
    assert torch.equal(loss, expected[0])
    assert grads.keys() == expected[1].keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, expected[1][name]), name


@pytest.mark.parametrize("chunk", [0, 1024])  # the whole loss, the chunked one
def test_the_backward_gets_back_exactly_what_the_forward_saved(lora_model, tiny_tokenizer, chunk):
    """Loss and every LoRA gradient bit for bit as without offloading (the same kernels on the same
    values: a copy there and back rounds nothing), and each checkpointed layer's input is among what
    went to host memory. Catches a tensor given back to the wrong saver (two layers' inputs swapped),
    a stale buffer, or a layer input left on the device."""
    batch = rows_batch(tiny_tokenizer)
    expected = loss_and_grads(lora_model, batch, chunk=chunk)
    offload = OffloadActivations(lora_model, CPU, min_bytes=0)
    assert_same(loss_and_grads(lora_model, batch, offload, chunk), expected)
    rows, length = batch["input_ids"].shape
    layer_input = (rows, length, lora_model.config.hidden_size)
    moved = [tuple(saved.host.shape) for saved in offload.saved]
    assert moved.count(layer_input) >= len(decoder_layers(lora_model))


@pytest.mark.parametrize("chunk", [0, 1024])  # the whole loss's log-softmax, the chunked loss's chunks
def test_what_the_final_norm_and_the_loss_save_stays_on_the_device(lora_model, tiny_tokenizer, chunk):
    """The backward needs what is saved after the last decoder layer first: copied out, it would only
    come straight back. So nothing saved from the final norm on is moved; on the next micro-batch the
    layers' inputs are moved again (the flag that stops the moves is reset); and no hook of the
    offloader's is left on the model after its block (left there, it would keep each
    --auto-batch-size attempt's offloader and host buffers alive). Catches the hook missing (the
    norm's input and the loss's chunks moved), never reset (nothing moved after the first
    micro-batch), or left behind."""
    offload = OffloadActivations(lora_model, CPU, min_bytes=0)
    norm = final_norm(lora_model)
    assert norm is lora_model.get_base_model().model.norm
    moved_before_norm = []
    handle = norm.register_forward_pre_hook(lambda module, args: moved_before_norm.append(len(offload.saved)))
    batch = rows_batch(tiny_tokenizer)
    try:
        for _ in range(2):  # two micro-batches through one offloader, as a step with accumulation
            loss_and_grads(lora_model, batch, offload, chunk)
            assert len(offload.saved) == moved_before_norm[-1] >= len(decoder_layers(lora_model))
    finally:
        handle.remove()
    dropped = weakref.ref(offload)
    offload = None  # as the run drops it
    assert_collected(dropped)


def test_weights_and_small_tensors_stay_where_they_are(tiny_model, tiny_config, tiny_tokenizer, monkeypatch):
    """A layer left out of checkpointing (--uncheckpointed-layers) saves its weights for its backward:
    they must not be copied out and back every step (they stay on the device anyway). Nor must a
    tensor under min_bytes."""
    lora_model = add_lora(tiny_model, tiny_config(uncheckpointed_layers=1))
    lora_model.train()
    weights = {p.untyped_storage().data_ptr() for p in lora_model.parameters()}
    offload = OffloadActivations(lora_model, CPU, min_bytes=0)
    moved, kept = [], []
    real = offload._worth_moving

    def spy(tensor):
        (moved if real(tensor) else kept).append(tensor)
        return real(tensor)

    monkeypatch.setattr(offload, "_worth_moving", spy)
    loss_and_grads(lora_model, rows_batch(tiny_tokenizer), offload)
    assert moved and not any(t.untyped_storage().data_ptr() in weights for t in moved)
    assert any(t.untyped_storage().data_ptr() in weights for t in kept)  # the last layer's weights were offered

    big = OffloadActivations(lora_model, CPU, min_bytes=10**9)
    loss_and_grads(lora_model, rows_batch(tiny_tokenizer), big)
    assert big.saved == []


def test_micro_batches_of_other_shapes_and_a_forward_cut_short(lora_model, tiny_tokenizer):
    """One offloader serves a whole run: micro-batches of different lengths (a buffer too small is
    made larger), and a forward stopped by an error (a signal abandons a step so) leaves nothing that
    changes the next micro-batch's gradients."""
    long = rows_batch(tiny_tokenizer)
    short = {key: value[:2, :5] for key, value in long.items()}
    expected = {name: loss_and_grads(lora_model, batch) for name, batch in (("long", long), ("short", short))}
    offload = OffloadActivations(lora_model, CPU, min_bytes=0)
    assert_same(loss_and_grads(lora_model, short, offload), expected["short"])
    assert_same(loss_and_grads(lora_model, long, offload), expected["long"])  # its buffers outgrow the short's

    layers = decoder_layers(lora_model)
    handle = layers[-1].register_forward_pre_hook(lambda module, args: (_ for _ in ()).throw(RuntimeError("cut")))
    with pytest.raises(RuntimeError, match="cut"):
        loss_and_grads(lora_model, long, offload)
    handle.remove()
    assert_same(loss_and_grads(lora_model, short, offload), expected["short"])
    dropped = weakref.ref(offload)
    offload = None
    assert_collected(dropped)  # the error took the offloader's hook with it


def test_a_cpu_run_refuses_it_in_one_line(tmp_path, tiny_config):
    """On a CPU there is no other memory to offload to: `on` is refused before anything loads, and
    auto settles to off (saved so in run_config.json)."""
    import json

    from yoda_raw import train

    with pytest.raises(YodaError, match="--offload-activations on .* use --offload-activations off"):
        train.main(tiny_config(offload_activations="on", output_dir=str(tmp_path / "on")))
    out = tmp_path / "auto"
    train.main(tiny_config({"max_steps": 1, "samples": False, "eval_fraction": 0.0}, output_dir=str(out)))
    assert json.loads((out / "run_config.json").read_text())["offload_activations"] == "off"
