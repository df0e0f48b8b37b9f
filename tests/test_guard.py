"""The NaN guard stays on the device: a bad step's gradients are zeroed at once, the run stops at its
next log line or checkpoint, and nothing after the bad step reaches the weights as NaN, a log or a file."""

import json

import pytest
import torch

from yoda_raw import train


def test_a_nan_between_log_lines_stops_at_the_next_one_with_finite_weights(tmp_path, monkeypatch, tiny_config):
    """NaN loss at step 3 of 8, logging every 5 steps, no checkpoints: the run stops at step 5 naming
    step 3, its metrics hold nothing past the bad step, no adapter is written, and the LoRA weights
    it leaves are finite. Catches a guard that lets NaN gradients into the optimizer (NaN weights), one
    that is never read (the run finishes), or one that names the step it noticed instead of the bad one."""
    real_loss, calls, models = train.token_loss_sum, [], []

    def nan_at_step_3(model, batch, *chunked):
        calls.append(1)
        if not models:
            models.append(model)
        loss = real_loss(model, batch, *chunked)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "token_loss_sum", nan_at_step_3)
    cfg = tiny_config(max_steps=8, logging_steps=5, samples=False, output_dir=str(tmp_path))
    with pytest.raises(train.NonFiniteLoss, match="step 3: .* stopped at step 5"):
        train.main(cfg)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or all(json.loads(line)["step"] < 3 for line in metrics.read_text().splitlines())
    lora = [p for name, p in models[0].named_parameters() if "lora_" in name]
    assert lora and all(torch.isfinite(p).all() for p in lora)


def test_zeroing_leaves_finite_gradients_alone():
    """With a finite norm the guard changes no gradient and raises no flag; with a NaN norm (every
    gradient NaN or 0 after clipping) it zeroes them and remembers the first bad step only."""
    finite = torch.nn.Parameter(torch.ones(3))
    finite.grad = torch.tensor([0.5, -1.0, 2.0])
    optimizer = torch.optim.SGD([finite], lr=0.1)
    flag = train.zero_nonfinite_grads(torch.tensor(2.3), optimizer, torch.tensor(0), step=1)
    assert flag.item() == 0 and finite.grad.tolist() == [0.5, -1.0, 2.0]
    finite.grad = torch.tensor([float("nan"), 0.0, float("nan")])
    flag = train.zero_nonfinite_grads(torch.tensor(float("nan")), optimizer, flag, step=2)
    assert flag.item() == 2 and finite.grad.tolist() == [0.0, 0.0, 0.0]
    flag = train.zero_nonfinite_grads(torch.tensor(float("inf")), optimizer, flag, step=3)
    assert flag.item() == 2
