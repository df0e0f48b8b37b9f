"""--uncheckpointed-layers: the last N decoder layers keep their activations instead of recomputing them."""

import bitsandbytes as bnb
import pytest
import torch
from conftest import assert_close_up_to_rounding

from tests.common import batch_of
from yoda_raw.fast.dequant import reuse_dequantized_weights
from yoda_raw.loss import token_loss_sum
from yoda_raw.model import decoder_layers


def step(model, batch, seed: int):
    """One forward and backward, counting how often each layer's MLP runs (twice where recomputed)."""
    runs = [0] * len(decoder_layers(model))
    for i, layer in enumerate(decoder_layers(model)):
        # Wrapped on the instance: module forward hooks do not fire in checkpointing's recompute.
        layer.mlp.forward = lambda *args, i=i, forward=layer.mlp.forward, **kwargs: (
            runs.__setitem__(i, runs[i] + 1) or forward(*args, **kwargs)
        )
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # LoRA dropout's masks
    loss = token_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, runs


def test_uncheckpointed_layers_learn_the_same_and_skip_their_recompute(tiny_tokenizer, tiny_qlora):
    """The same loss and LoRA gradients as with every layer checkpointed (dropout masks included),
    and the last layer's forward runs once instead of twice. Catches the wrong end of the stack
    left out, a layer still recomputed, or dropout drawing other masks without the recompute."""
    batch = batch_of(tiny_tokenizer)
    # LoRA dropout on (the tiny preset has none), so that the dropout masks are compared too.
    all_checkpointed = tiny_qlora(lora_dropout=0.1, uncheckpointed_layers=0)
    last_kept = tiny_qlora(lora_dropout=0.1, uncheckpointed_layers=1)
    assert [layer.gradient_checkpointing for layer in decoder_layers(last_kept)] == [True, False]

    loss, grads, runs = step(all_checkpointed, batch, seed=7)
    kept_loss, kept_grads, kept_runs = step(last_kept, batch, seed=7)
    assert runs == [2, 2] and kept_runs == [2, 1]
    # The same sums whether recomputed or kept, so equal up to fp32 rounding of the tiny model's step
    # (conftest: 7.2e-5 of each tensor's size); other dropout masks (p = 0.1) change them by percents.
    assert_close_up_to_rounding(kept_loss, loss, name="loss sum")
    assert kept_grads.keys() == grads.keys() and grads
    for name in grads:
        assert_close_up_to_rounding(kept_grads[name], grads[name], name=name)


def test_reuse_dequant_only_in_checkpointed_layers_fp8_in_all(tiny_qlora):
    """An uncheckpointed layer keeps bitsandbytes' own 4-bit matmul: with the reuse its dequantized
    weights would stay from the forward to the backward, every one of them. With FP8 it takes the
    FP8 matmul too (its e4m3 weight, half the size, is what stays)."""
    from yoda_raw.fast.dequant import MatmulDequantizedOnceFP8

    model = tiny_qlora(lora_dropout=0.1, uncheckpointed_layers=1)
    first, last = decoder_layers(model)
    linears = [[m for m in layer.modules() if isinstance(m, bnb.nn.Linear4bit)] for layer in (first, last)]
    assert reuse_dequantized_weights(model) == len(linears[0]) > 0
    assert all("forward" in linear.__dict__ for linear in linears[0])  # replaced on the instance
    assert not any("forward" in linear.__dict__ for linear in linears[1])

    model = tiny_qlora(lora_dropout=0.1, uncheckpointed_layers=1)
    linears = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert reuse_dequantized_weights(model, fp8=True) == len(linears)
    assert all(linear.dequantized_matmul is MatmulDequantizedOnceFP8 for linear in linears)


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["--uncheckpointed-layers", "3"],
            "error: --uncheckpointed-layers 3 is more than the model's 2 decoder layers; use at most 2 "
            "(or --no-gradient-checkpointing)",
        ),
        (["--uncheckpointed-layers", "-1"], "error: --uncheckpointed-layers must be 0 or more, got -1"),
        (
            ["--uncheckpointed-layers", "1", "--no-gradient-checkpointing"],
            "error: --uncheckpointed-layers leaves some layers out of gradient checkpointing, which is off; "
            "drop --no-gradient-checkpointing or --uncheckpointed-layers",
        ),
    ],
)
def test_a_wrong_uncheckpointed_layers_is_one_line(argv, line, tmp_path, capsys):
    """Before any weights load, and nothing written."""
    import run

    out = tmp_path / "out"
    assert run.main(["--preset", "tiny", *argv, "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not out.exists() or not any(p.name != ".lock" for p in out.iterdir())
