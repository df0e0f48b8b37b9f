"""Optimizer and schedule: the Trainer's hyper-parameters, not bitsandbytes' own defaults."""

import pytest
import torch

from yoda_raw.fast.flat import FlatAdamW, flat_optimizer
from yoda_raw.optim import build_optimizer, learning_rate

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", ["paged_adamw_8bit", "adamw_8bit", "adamw"])
def test_hyperparameters_are_the_trainers(name):
    """bnb.optim.PagedAdamW8bit defaults to weight decay 0.01; the Trainer (and we) use 0."""
    params = [torch.nn.Parameter(torch.zeros(64, 64)), torch.nn.Parameter(torch.zeros(3), requires_grad=False)]
    optimizer = build_optimizer(params, name, lr=3e-4, weight_decay=0.0, device=CPU)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (3e-4, (0.9, 0.999), 1e-8, 0.0)
    assert len(group["params"]) == 1  # frozen parameters get no optimizer state


def test_paged_falls_back_on_cpu_and_says_so(capsys):
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(64, 64))], "paged_adamw_8bit", 3e-4, 0.0, CPU)
    assert optimizer.is_paged is False
    assert "paging needs a CUDA GPU" in capsys.readouterr().err


def test_eight_bit_state_for_large_tensors():
    """bitsandbytes keeps 8-bit state only for tensors of 4096+ elements."""
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(8, 8))
    optimizer = build_optimizer([big, small], "adamw_8bit", 3e-4, 0.0, CPU)
    (big.grad, small.grad) = (torch.randn_like(big), torch.randn_like(small))
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32


def test_learning_rate_matches_transformers_schedule():
    """Same rates as the Trainer's get_linear_schedule_with_warmup, warm-up or not, ending at 0."""
    from transformers import get_linear_schedule_with_warmup

    for warmup in (0, 5):
        theirs = get_linear_schedule_with_warmup(
            torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4), warmup, 22
        )
        for step in range(22):
            # fp64 on both sides, a few operations on 3e-4 (u = 1.1e-16: ~1e-19 apart); a schedule one
            # step off is 3e-4 / 22 = 1.4e-5 off.
            assert learning_rate(step, 3e-4, warmup, 22) == pytest.approx(theirs.get_last_lr()[0], abs=1e-15)
            theirs.optimizer.step()
            theirs.step()
    assert learning_rate(22, 3e-4, 0, 22) == 0.0
    assert learning_rate(110, 3e-4, 0, 220) == pytest.approx(1.5e-4)  # fp64: approx's 1e-6 relative is ample


# --- the flat 8-bit AdamW (the CUDA graph's loop) -------------------------------------------------

SHAPES = [(8, 512), (1536, 8), (16, 256)]  # LoRA-like: whole 256-element blocks, 4096+ elements each


def lora_like_params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02) for shape in SHAPES]


def backward_of_a_step(params, step: int) -> None:
    """Gradients as the loop makes them: autograd's backward, adding into .grad."""
    generator = torch.Generator().manual_seed(100 + step)
    targets = [torch.randn(p.shape, generator=generator) for p in params]
    sum(((p - t) ** 2 * (i + 1)).sum() for i, (p, t) in enumerate(zip(params, targets, strict=True))).backward()


def test_flat_adamw_updates_exactly_as_the_per_tensor_one():
    """One kernel over a flat tensor gives bitsandbytes' per-tensor 8-bit AdamW's parameters bit for
    bit, step after step, with the gradients added by autograd into the flat gradient's views and
    zeroed in place. Catches blocks that straddle two tensors, a gradient that lands outside the flat
    tensor (the update would then see zeros), or a zero_grad that frees it."""
    plain, flat = lora_like_params(), lora_like_params()
    per_tensor = build_optimizer(plain, "adamw_8bit", 1e-2, 0.0, CPU)
    one = flat_optimizer(build_optimizer(flat, "adamw_8bit", 1e-2, 0.0, CPU))
    assert isinstance(one, FlatAdamW) and not isinstance(per_tensor, FlatAdamW)
    for step in range(4):
        backward_of_a_step(plain, step)
        backward_of_a_step(flat, step)
        assert one.flat.grad.abs().sum() > 0  # autograd added into the views
        per_tensor.step()
        one.step()
        per_tensor.zero_grad(set_to_none=True)
        one.zero_grad(set_to_none=True)  # in place whatever it is asked
        for a, b in zip(plain, flat, strict=True):
            assert torch.equal(a, b), step
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in flat)
    assert one.state[one.flat]["state1"].dtype == torch.uint8


def test_flat_adamw_checkpoints_hold_the_per_tensor_state():
    """A checkpoint of the flat optimizer loads into bitsandbytes' per-tensor one and back, and each
    then takes the same next step as an optimizer never saved: resume works across the two layouts."""
    reference, flat = lora_like_params(), lora_like_params()
    ref_opt = build_optimizer(reference, "adamw_8bit", 1e-2, 0.0, CPU)
    flat_opt = flat_optimizer(build_optimizer(flat, "adamw_8bit", 1e-2, 0.0, CPU))
    for step in range(2):
        for params, optimizer in ((reference, ref_opt), (flat, flat_opt)):
            backward_of_a_step(params, step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    saved = flat_opt.state_dict()
    assert len(saved["state"]) == len(SHAPES)  # per tensor, as PagedAdamW8bit writes it

    as_per_tensor = [torch.nn.Parameter(p.detach().clone()) for p in flat]
    per_tensor_opt = build_optimizer(as_per_tensor, "adamw_8bit", 1e-2, 0.0, CPU)
    per_tensor_opt.load_state_dict(saved)
    as_flat = [torch.nn.Parameter(p.detach().clone()) for p in reference]
    as_flat_opt = flat_optimizer(build_optimizer(as_flat, "adamw_8bit", 1e-2, 0.0, CPU))
    as_flat_opt.load_state_dict(ref_opt.state_dict())
    for params, optimizer in ((reference, ref_opt), (as_per_tensor, per_tensor_opt), (as_flat, as_flat_opt)):
        backward_of_a_step(params, 2)
        optimizer.step()
    for a, b, c in zip(reference, as_per_tensor, as_flat, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_flat_adamw_survives_accelerates_prepare():
    """Accelerate's prepare() round-trips a fresh optimizer's state_dict (to move it to the device):
    the flat optimizer, with no state yet, takes that and then updates exactly as the per-tensor
    one. Its first GPU run failed here, refusing the empty state as "not 8-bit AdamW state"."""
    from accelerate import Accelerator

    plain, flat = lora_like_params(), lora_like_params()
    per_tensor = build_optimizer(plain, "adamw_8bit", 1e-2, 0.0, CPU)
    prepared = Accelerator(cpu=True).prepare(flat_optimizer(build_optimizer(flat, "adamw_8bit", 1e-2, 0.0, CPU)))
    assert isinstance(prepared.optimizer, FlatAdamW)
    for step in range(2):
        backward_of_a_step(plain, step)
        backward_of_a_step(flat, step)
        per_tensor.step()
        prepared.step()
        per_tensor.zero_grad()
        prepared.zero_grad()
    for a, b in zip(plain, flat, strict=True):
        assert torch.equal(a, b)


def test_flat_adamw_only_where_it_is_exact():
    """A tensor of fewer than 4096 elements (32-bit state) or of a partial block keeps the per-tensor
    optimizer; so does torch's AdamW."""
    odd = [torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 512))]
    assert not isinstance(flat_optimizer(build_optimizer(odd, "adamw_8bit", 1e-3, 0.0, CPU)), FlatAdamW)
    partial = [torch.nn.Parameter(torch.zeros(4100))]
    assert not isinstance(flat_optimizer(build_optimizer(partial, "adamw_8bit", 1e-3, 0.0, CPU)), FlatAdamW)
    assert not isinstance(flat_optimizer(build_optimizer(lora_like_params(), "adamw", 1e-3, 0.0, CPU)), FlatAdamW)


def test_an_adapter_of_flat_parameters_saves_and_loads(tmp_path, tiny_model):
    """Made views of one flat tensor, the LoRA parameters still save as a normal adapter (peft's
    save_pretrained, safetensors, which refuses tensors that share memory unless peft separates
    them) and load back into the views, where the optimizer sees them."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    lora_model = get_peft_model(tiny_model, LoraConfig(r=8, target_modules=["o_proj", "qkv_proj"]))
    params = [p for p in lora_model.parameters() if p.requires_grad]
    optimizer = FlatAdamW(params, optim_bits=8, is_paged=False, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    with torch.no_grad():
        optimizer.flat.add_(0.5)  # a step's worth of change, through the flat tensor
    expected = {name: p.detach().clone() for name, p in lora_model.named_parameters() if p.requires_grad}
    lora_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert len(saved) == len(expected)
    for name, value in saved.items():
        assert torch.equal(value, expected[name.replace(".weight", ".default.weight")]), name

    with torch.no_grad():
        optimizer.flat.zero_()
    set_peft_model_state_dict(lora_model, saved)
    for name, p in lora_model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[name])
    assert torch.equal(optimizer.flat, torch.cat([expected[n].reshape(-1) for n in expected]))
