"""--auto-batch-size: an attempt that runs out of memory leaves nothing behind for the next one."""

import json

import torch

from yoda_raw import train


def test_a_retry_keeps_one_metrics_line_per_step_and_no_stale_gradients(tmp_path, monkeypatch, capsys, tiny_config):
    """Out of memory at the second step while a micro-batch has more than 4 rows (as the CUDA graph's
    capture does at the edge of a card): the run retries with 0.9x the rows down to 4. metrics.jsonl
    then holds steps 1, 2, 3 once each, all at 4 rows (not the failed attempts' step-1 lines), and
    every retry starts without the failed attempt's gradients."""
    real_forward_backward, steps_seen, grads_at_start = train.forward_backward, {}, []

    def tight_memory(accelerator, model, micro_batches, n_supervised):
        rows = micro_batches[0]["input_ids"].shape[0]
        steps_seen[rows] = steps_seen.get(rows, 0) + 1
        if steps_seen[rows] == 1:
            grads_at_start.append(any(p.grad is not None for p in model.parameters()))
        if rows > 4 and steps_seen[rows] == 2:
            lora = next(p for p in model.parameters() if p.requires_grad)
            lora.grad = torch.ones_like(lora)  # a partial gradient
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward_backward(accelerator, model, micro_batches, n_supervised)

    monkeypatch.setattr(train, "forward_backward", tight_memory)
    overrides = {"batch_size": 6, "auto_batch_size": True, "max_steps": 3, "logging_steps": 1, "samples": False}
    train.main(tiny_config(overrides, output_dir=str(tmp_path)))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {r["batch_size"] for r in records} == {4}
    assert "retrying with --batch-size 5" in capsys.readouterr().err
    assert grads_at_start == [False, False, False]  # attempts at 6, 5 and 4 rows each began clean
