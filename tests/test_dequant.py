"""--reuse-dequant: the same loss and gradients as bitsandbytes' own 4-bit matmul, one dequantization fewer."""

import bitsandbytes as bnb
import torch

from yoda_raw.dequant import reuse_dequantized_weights
from yoda_raw.loss import token_loss_sum
from yoda_raw.packing import Collator


def loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_reused_dequantization_gives_bitsandbytes_loss_and_gradients(tiny_tokenizer, tiny_qlora, monkeypatch):
    """Loss and every LoRA gradient equal bitsandbytes' own path, with checkpointing on, and the
    backward dequantizes nothing: each weight is dequantized in the forward and in the recompute
    only. Catches a backward that uses the weight untransposed, loses the compute dtype, or a
    forward that is never replaced."""
    rows = [{"input_ids": list(range(5, 17)), "labels": [-100] * 3 + list(range(8, 17))} for _ in range(2)]
    batch = Collator(tiny_tokenizer.pad_token_id)(rows)
    model = tiny_qlora()
    assert model.is_gradient_checkpointing
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.bfloat16  # not the model's fp32: a forward that drops it shows
    plain_loss, plain_grads = loss_and_grads(model, batch)

    layers = reuse_dequantized_weights(model)
    assert layers == sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) > 0
    calls = []
    dequantize = bnb.functional.dequantize_4bit
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda *a, **k: calls.append(1) or dequantize(*a, **k))
    loss, grads = loss_and_grads(model, batch)
    assert len(calls) == 2 * layers  # forward and recompute; bitsandbytes' backward would add one more each

    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_reuse_dequant_needs_checkpointing(tmp_path, capsys):
    """Without checkpointing every layer's dequantized weight would be kept: one line, before loading."""
    import run

    code = run.main(
        ["--preset", "tiny", "--reuse-dequant", "on", "--no-gradient-checkpointing", "--output-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: --reuse-dequant on keeps each layer's dequantized weights from the recompute to the backward, so "
        "it needs gradient checkpointing; drop --no-gradient-checkpointing or use --reuse-dequant off"
    ]
    assert not any(tmp_path.iterdir())  # nothing written


def test_reuse_dequant_auto_follows_the_cuda_graph_and_on_needs_a_4bit_base(tmp_path, capsys):
    """auto is on only on the fast path (CUDA graph, 4-bit base, checkpointing); the CPU run's saved
    config says off; asking for it on an unquantized base is one line, nothing written."""
    import json

    import run
    from yoda_raw.dequant import resolve

    assert resolve("auto", "on", "nf4", True) == "on"
    assert resolve("auto", "on", "nf4", False) == "off"
    assert resolve("auto", "off", "nf4", True) == "off"
    assert resolve("off", "on", "nf4", True) == "off"
    out = tmp_path / "run"
    assert (
        run.main(
            ["--preset", "tiny", "--max-steps", "1", "--eval-fraction", "0", "--no-samples", "--output-dir", str(out)]
        )
        == 0
    )
    assert json.loads((out / "run_config.json").read_text())["reuse_dequant"] == "off"
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert run.main(["--preset", "tiny", "--quant", "none", "--reuse-dequant", "on", "--output-dir", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --reuse-dequant on needs a 4-bit base (--quant nf4); use --reuse-dequant off"
    ]
    assert not bad.exists() or not any(bad.iterdir())


def test_without_gradients_the_layer_is_bitsandbytes_own(tiny_tokenizer, tiny_qlora, monkeypatch):
    """Evaluation and generation (no gradients) take bitsandbytes' forward, with its one-token
    kernel; only a forward that will have a backward goes through the shared dequantization."""
    model = tiny_qlora()
    reuse_dequantized_weights(model)
    calls = []
    forward = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or forward(self, x))
    ids = torch.tensor([list(range(5, 13))])
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    calls.clear()
    model(input_ids=ids).logits.sum().backward()
    assert calls == []
