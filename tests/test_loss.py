"""--chunked-loss: the LM head and cross-entropy a chunk of positions at a time, the same loss."""

import json

import pytest
import torch
from conftest import assert_close_up_to_rounding, rounding_tolerance

from tests.common import metrics, refused_in_one_line
from yoda_raw import loss
from yoda_raw.chat import IGNORE
from yoda_raw.loss import token_loss_sum
from yoda_raw.packing import Collator


def rows_batch(tokenizer) -> dict:
    """Three rows, one shorter (padding), some labels masked: every case the loss must skip."""
    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12], "labels": [IGNORE, IGNORE, 7, 8, 9, 10, 11, 12]},
        {"input_ids": [13, 14, 15, 16, 17, 18, 19, 20], "labels": [13, 14, 15, IGNORE, 17, 18, 19, 20]},
        {"input_ids": [21, 22, 23, 24], "labels": [IGNORE, 22, 23, 24]},
    ]
    return Collator(tokenizer.pad_token_id)(rows)


def loss_and_grads(model, batch, chunk: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    value = token_loss_sum(model, batch, chunk)
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


@pytest.mark.parametrize("chunk", [5, 7, 1024])  # chunks that split rows, a ragged last chunk, one chunk
def test_chunked_loss_equals_the_whole_one(tiny_model, tiny_tokenizer, chunk):
    """The same loss sum and gradients as cross-entropy over all the logits at once, whatever the
    chunk size. Catches a chunk that drops or repeats positions, a shift lost at a chunk edge, masked
    labels counted, or gradients that do not flow back through the checkpointed chunks."""
    batch = rows_batch(tiny_tokenizer)
    tiny_model.train()
    whole, whole_grads = loss_and_grads(tiny_model, batch, 0)
    chunked, chunked_grads = loss_and_grads(tiny_model, batch, chunk)
    # The same fp32 sums in another grouping (the head's gradient split by chunk): equal up to the
    # tiny model's rounding (conftest), 7.2e-5 of each tensor's size, compared norm-wise so that an
    # element near zero by cancellation passes on any CPU. A position lost or doubled moves the sum
    # by a whole term (about 6, ln V), a missing chunk a gradient by its whole share.
    assert_close_up_to_rounding(chunked, whole, name="loss sum")
    assert chunked_grads.keys() == whole_grads.keys() and chunked_grads
    for name, grad in chunked_grads.items():
        assert_close_up_to_rounding(grad, whole_grads[name], name=name)


def test_the_forward_never_makes_every_positions_logits(tiny_model, tiny_tokenizer, monkeypatch):
    """With the head set aside the model's forward returns (B, T, H) hidden states, and the head's
    matmul sees at most `chunk` positions at a time; the head is back in place afterwards, also after
    an error. Catches a forward that still computes all logits (no memory saved), and a head left out."""
    batch = rows_batch(tiny_tokenizer)
    head = tiny_model.get_output_embeddings()
    outputs, products = [], []
    tiny_model.model.register_forward_hook(lambda module, args, output: outputs.append(output.last_hidden_state.shape))
    real_linear = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        if weight is head.weight:
            products.append(x.shape[0])
        return real_linear(x, weight, bias)

    monkeypatch.setattr(loss.F, "linear", spy)
    with loss.head_set_aside(tiny_model):
        hidden = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert hidden.shape == outputs[-1] and hidden.shape[-1] == tiny_model.config.hidden_size
    assert tiny_model.get_output_embeddings() is head
    token_loss_sum(tiny_model, batch, 6)
    n_positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    assert products and max(products) <= 6 and sum(products) == n_positions
    with pytest.raises(RuntimeError, match="boom"), loss.head_set_aside(tiny_model):
        raise RuntimeError("boom")
    assert tiny_model.get_output_embeddings() is head


def test_a_run_with_the_chunked_loss_logs_the_same_losses(tmp_path, tiny_config, monkeypatch):
    """The loop with --chunked-loss on trains as with off: the same per-step losses, and the saved
    config says which ran, with its --loss-chunk. Catches the option or the chunk size not reaching
    the step (spied on: the chunks the loss makes), or an auto left unsettled."""
    from yoda_raw import train

    sizes = []
    real = loss.chunked_cross_entropy
    monkeypatch.setattr(loss, "chunked_cross_entropy", lambda *a: sizes.append(a[-1]) or real(*a))
    losses = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        options = {"max_steps": 3, "logging_steps": 1, "samples": False, "eval_fraction": 0.0}
        chunk = {"loss_chunk": 100} if setting == "on" else {}  # several chunks a micro-batch of the tiny preset
        train.main(tiny_config(options, chunked_loss=setting, output_dir=str(out), **chunk))
        losses[setting] = [record["loss"] for record in metrics(out)]
        saved = json.loads((out / "run_config.json").read_text())
        assert (saved["chunked_loss"], saved["loss_chunk"]) == (setting, 100 if setting == "on" else 1024)
    assert sizes and set(sizes) == {100}
    # Three steps from the same start, the sums grouped otherwise: fp32 rounding of the tiny model's
    # step, once a step (conftest), 2.2e-4 of the loss; the option not reaching the step changes nothing
    # (caught by the saved config), a chunk lost moves the loss by percents.
    assert losses["on"] == pytest.approx(losses["off"], rel=0, abs=rounding_tolerance(max(losses["off"]), steps=3))


@pytest.mark.parametrize("chunk", ["256", "0"])
def test_loss_chunk_where_it_cannot_work_is_one_line(tmp_path, capsys, chunk):
    """A chunk size where the loss is not chunked (a CPU's default) would do nothing, and a chunk of
    no positions would loop forever: one line each, exit 2, nothing written."""
    expected = {
        "256": "error: --loss-chunk 256 sizes the chunked loss's chunks, and the loss is not chunked here; "
        "drop --loss-chunk, or add --chunked-loss on",
        "0": "error: --loss-chunk must be at least 1 position, got 0",
    }
    assert refused_in_one_line(["--preset", "tiny", "--loss-chunk", chunk], tmp_path / "run", capsys) == expected[chunk]
