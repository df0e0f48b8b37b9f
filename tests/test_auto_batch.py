"""--auto-batch-size: an attempt that runs out of memory leaves nothing behind for the next one."""

import pytest
import torch

from tests.common import metrics
from yoda_raw import train
from yoda_raw.errors import YodaError


def test_a_retry_keeps_one_metrics_line_per_step_and_no_stale_gradients(tmp_path, monkeypatch, capsys, tiny_config):
    """Out of memory at the second step while a micro-batch has more than 4 rows (as the CUDA graph's
    capture does at the edge of a card): the run retries with 0.9x the rows down to 4. metrics.jsonl
    then holds steps 1, 2, 3 once each, all at 4 rows (not the failed attempts' step-1 lines), and
    every retry starts without the failed attempt's gradients."""
    real_forward_backward, steps_seen, grads_at_start = train.EagerStep.forward_backward, {}, []

    def tight_memory(step, micro_batches, n_supervised):
        rows = micro_batches[0]["input_ids"].shape[0]
        steps_seen[rows] = steps_seen.get(rows, 0) + 1
        if steps_seen[rows] == 1:
            grads_at_start.append(any(p.grad is not None for p in step.model.parameters()))
        if rows > 4 and steps_seen[rows] == 2:
            lora = next(p for p in step.model.parameters() if p.requires_grad)
            lora.grad = torch.ones_like(lora)  # a partial gradient
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward_backward(step, micro_batches, n_supervised)

    monkeypatch.setattr(train.EagerStep, "forward_backward", tight_memory)
    overrides = {"batch_size": 6, "auto_batch_size": True, "max_steps": 3, "logging_steps": 1, "samples": False}
    train.main(tiny_config(overrides, output_dir=str(tmp_path)))
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {r["batch_size"] for r in records} == {4}
    assert "retrying with --batch-size 5" in capsys.readouterr().err
    assert grads_at_start == [False, False, False]  # attempts at 6, 5 and 4 rows each began clean


def test_out_of_memory_in_the_graphs_capture_says_the_batch_fit_without_it(tmp_path, monkeypatch, capsys, tiny_config):
    """Where the CUDA graph's capture (its second step) runs out of memory, the first step, the same
    batch without the graph, fit: each retry says so and names --cuda-graph off, and so does the
    error once no retry is left. The capture is stood in for (no GPU): an out-of-memory error marked
    as the graph's step marks it. Catches the mark dropped on its way up."""
    real_forward_backward, steps_seen = train.EagerStep.forward_backward, {}

    def capture_out_of_memory(step, micro_batches, n_supervised):
        rows = micro_batches[0]["input_ids"].shape[0]
        steps_seen[rows] = steps_seen.get(rows, 0) + 1
        if rows > 4 and steps_seen[rows] == 2:
            err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            err.in_graph_capture = True
            raise err
        return real_forward_backward(step, micro_batches, n_supervised)

    monkeypatch.setattr(train.EagerStep, "forward_backward", capture_out_of_memory)
    overrides = {"batch_size": 6, "auto_batch_size": True, "max_steps": 2, "logging_steps": 1, "samples": False}
    train.main(tiny_config(overrides, output_dir=str(tmp_path / "retried")))
    err = capsys.readouterr().err
    for rows in (6, 5):
        assert f"out of memory at --batch-size {rows}: it ran out in the CUDA graph's capture" in err
    assert err.count("--cuda-graph off needs less memory") == 2

    overrides |= {"auto_batch_size": False}
    steps_seen.clear()
    with pytest.raises(YodaError, match=r"at --batch-size 6; it ran out in the CUDA graph's capture") as info:
        train.main(tiny_config(overrides, output_dir=str(tmp_path / "not-retried")))
    assert "\n" not in str(info.value) and "--cuda-graph off" in str(info.value)


def out_of_memory_always(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_without_auto_batch_size_is_one_line(tmp_path, monkeypatch, tiny_config):
    """Catches an out-of-memory error in the loop ending in a traceback that names no option (issue 14,
    item 19): the line names the batch size and the options that lower it."""
    monkeypatch.setattr(train.EagerStep, "forward_backward", out_of_memory_always)
    overrides = {"batch_size": 6, "auto_batch_size": False, "max_steps": 3, "samples": False}
    with pytest.raises(YodaError, match=r"out of GPU memory at --batch-size 6; pass --auto-batch-size") as info:
        train.main(tiny_config(overrides, output_dir=str(tmp_path)))
    assert "\n" not in str(info.value) and "lower --batch-size" in str(info.value)


def test_auto_batch_size_down_to_one_row_is_one_line(tmp_path, monkeypatch, tiny_config):
    """Catches --auto-batch-size running out of batch sizes (2 rows, 1 row, then accelerate's
    'No executable batch size found, reached zero.' traceback)."""
    monkeypatch.setattr(train.EagerStep, "forward_backward", out_of_memory_always)
    overrides = {"batch_size": 2, "auto_batch_size": True, "max_steps": 3, "samples": False}
    with pytest.raises(YodaError, match=r"at --batch-size 1; --auto-batch-size found no smaller batch"):
        train.main(tiny_config(overrides, output_dir=str(tmp_path)))


def test_out_of_memory_on_several_processes_is_not_retried(tmp_path, monkeypatch, tiny_config):
    """Catches --auto-batch-size retrying on one process of several (the others wait for it in the
    step's all-reduce: a hang, or processes on different batch sizes). Here the run believes it has 2
    processes; the error comes at the first step's forward, before any collective between them."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    monkeypatch.setattr(train.EagerStep, "forward_backward", out_of_memory_always)
    overrides = {"batch_size": 6, "auto_batch_size": True, "max_steps": 3, "samples": False}
    with pytest.raises(YodaError, match=r"at --batch-size 6; with 2 processes --auto-batch-size cannot retry"):
        train.main(tiny_config(overrides, output_dir=str(tmp_path)))
