"""--seeded-dropout: LoRA's dropout masks from one seed a module and micro-step (yoda_raw/dropout.py)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close_up_to_rounding

from tests.common import batch_of, lora_layers
from yoda_raw.fast.compile import compile_layers
from yoda_raw.fast.dropout import SeededDropout, dropout_mask, use_seeded_dropout
from yoda_raw.loss import token_loss_sum


def test_seeded_dropout_keeps_one_minus_p_and_scales_as_torch_dropout():
    """In training: about 1 - p of the elements kept, each scaled by 1 / (1 - p), the rest zero, and
    the gradient is the same mask and scale; in evaluation the input itself. One seed gives one
    mask, another seed another. Catches p and 1 - p swapped, a missing scale, or a mask that does not
    follow its seed."""
    dropout = SeededDropout(0.05)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    # 200,000 draws kept with p 0.95: the share's standard deviation is sqrt(0.95 * 0.05 / 2e5) = 4.9e-4,
    # so +-0.003 is 6 of them (a false alarm once in 1e9 runs); p and 1 - p swapped gives 0.05.
    assert 0.947 < kept.float().mean().item() < 0.953
    # One fp32 multiply or divide each side, rounded once (u = 6e-8 of the value): assert_close's fp32
    # default (rtol 1.3e-6) holds on any CPU, and a missing or inverted scale is 5% off.
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.95))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / 0.95)
    assert dropout.eval()(x) is x

    seed = torch.tensor(1234)
    assert torch.equal(dropout_mask(seed, 1000, 0.3), dropout_mask(seed, 1000, 0.3))
    assert not torch.equal(dropout_mask(seed, 1000, 0.3), dropout_mask(torch.tensor(1235), 1000, 0.3))


def seeded_step(model, batch, seed: int):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# Compiled: inductor on a CPU takes seconds a layer, so that case runs in the slow tier.
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_the_recompute_draws_the_forward_masks(tiny_tokenizer, tiny_qlora, compiled):
    """With every layer checkpointed, the recompute makes the forward's masks again from the same
    seeds: the same loss and LoRA gradients as with the last layer left out of checkpointing (where
    nothing is recomputed), eager and with the layers compiled (where torch.compile recomputes the
    mask in the backward from its saved seed). The masks are not torch dropout's: the gradients
    differ from the same model's with torch's dropout (the loss does not: LoRA's B starts at zero).
    Catches a mask drawn anew in the recompute (other gradients than the forward's masks give), or
    a dropout that was never replaced."""
    batch = batch_of(tiny_tokenizer)
    results = []
    for uncheckpointed in (0, 1):
        model = tiny_qlora(lora_dropout=0.3, uncheckpointed_layers=uncheckpointed)
        assert use_seeded_dropout(model) == sum(len(layer.lora_dropout) for layer in lora_layers(model)) > 0
        if compiled:
            torch._dynamo.reset()
            compile_layers(model)
        results.append(seeded_step(model, batch, seed=7))
    (loss, grads), (kept_loss, kept_grads) = results
    # The same sums whether recomputed or kept (inductor may fuse them otherwise), so equal up to fp32
    # rounding of the tiny model's step (conftest: 7.2e-5 of each tensor's size); masks drawn anew
    # (p = 0.3) change the gradients by tens of percent.
    assert_close_up_to_rounding(kept_loss, loss, name="loss sum")
    assert kept_grads.keys() == grads.keys() and grads
    for name in grads:
        assert_close_up_to_rounding(kept_grads[name], grads[name], name=name)
    _, torch_dropout_grads = seeded_step(tiny_qlora(lora_dropout=0.3), batch, seed=7)
    # Other masks (p = 0.3) move gradients by tens of percent: far outside allclose's 1e-5.
    assert not all(torch.allclose(torch_dropout_grads[name], grads[name]) for name in grads)
    if compiled:
        torch._dynamo.reset()


def test_seeded_dropout_without_dropout_is_one_line(tmp_path, capsys):
    """--seeded-dropout on with --lora-dropout 0 (the tiny preset's) would do nothing: one line,
    nothing written."""
    import run

    out = tmp_path / "run"
    assert run.main(["--preset", "tiny", "--seeded-dropout", "on", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --seeded-dropout on makes LoRA's dropout masks, and --lora-dropout is 0 (no dropout); "
        "drop --seeded-dropout on or set --lora-dropout"
    ]
    assert not out.exists() or not any(out.iterdir())


def test_the_triton_mask_kernel_keeps_one_minus_p_and_follows_its_seed(tmp_path):
    """kernels.py's mask kernel (the GPU's) in Triton's interpreter, on this CPU: about 1 - p kept,
    the same mask for the same seed, another for another seed, a longer mask starting with the
    shorter one's, and nothing written past its end. Skipped where Triton is not installed (CPU
    builds of torch lack it; the GPU suite runs the kernel itself). Catches p and 1 - p swapped, the
    four numbers of a draw written over each other, or a tail left unwritten."""
    pytest.importorskip("triton")
    # 50,003 draws kept with p 0.95: standard deviation of the share sqrt(0.95 * 0.05 / 50003) = 9.7e-4,
    # +-0.005 is 5 of them; at p 0.999 the share is 0.001 +- 1.4e-4, and 0.01 is 64 of them.
    script = (
        "import torch\n"
        "from yoda_raw.fast import kernels\n"
        "def mask(seed, n, p=0.05, fill=False):\n"
        "    out = torch.full((n + 7,), fill)\n"
        "    kernels.dropout_mask(torch.tensor(seed), p, out[:n])\n"
        "    assert (out[n:] == fill).all()\n"
        "    return out[:n]\n"
        "a = mask(11, 50_003)\n"
        "assert 0.945 < a.float().mean().item() < 0.955, a.float().mean()\n"
        "assert torch.equal(a, mask(11, 50_003)) and not torch.equal(a, mask(12, 50_003))\n"
        "assert torch.equal(mask(11, 4_099), a[:4_099])\n"
        "assert mask(11, 50_003, p=0.999, fill=True).float().mean() < 0.01\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, cwd=tmp_path.parent)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
