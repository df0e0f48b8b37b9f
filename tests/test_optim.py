"""Optimizer and schedule: the Trainer's hyper-parameters, not bitsandbytes' own defaults."""

import pytest
import torch

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
            assert learning_rate(step, 3e-4, warmup, 22) == pytest.approx(theirs.get_last_lr()[0], abs=1e-15)
            theirs.optimizer.step()
            theirs.step()
    assert learning_rate(22, 3e-4, 0, 22) == 0.0
    assert learning_rate(110, 3e-4, 0, 220) == pytest.approx(1.5e-4)
