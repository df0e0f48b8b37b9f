"""What several test modules share: the option set of a plain tiny run, a fresh Accelerate state, a
signal sent mid-run, reading an error line and metrics.jsonl, waiting on (and signalling) a run in
another process, and a tiny model's batch with LoRA given values."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from yoda_raw.model import decoder_layers
from yoda_raw.packing import Collator

# A short, plain run on a CPU: fp32, unquantized, nothing held out, no samples, the batch asked for,
# a loss logged every step, 4 steps.
PLAIN_RUN = {
    "quant": "none",
    "precision": "fp32",
    "eval_fraction": 0.0,
    "samples": False,
    "auto_batch_size": False,
    "logging_steps": 1,
    "max_steps": 4,
}


def fresh_accelerator_state() -> None:
    """Forget Accelerate's per-process singleton state, so that the next train.main builds its own
    (conftest does this after every test; a test that runs several trainings calls it between them)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def signal_at_call(monkeypatch, owner, name: str, call: int, signum: int, before: bool = False) -> None:
    """Send `signum` to this process at the `call`-th call of `owner.name` (a function of a module,
    or a method of a class): right after the real call returns, or with `before`, just before it.
    E.g. right after step 3's forward (`train`, "token_loss_sum", 3): in the middle of a step."""
    real, calls = getattr(owner, name), []

    def call_and_signal(*args, **kwargs):
        calls.append(1)
        if before and len(calls) == call:
            os.kill(os.getpid(), signum)
        result = real(*args, **kwargs)
        if not before and len(calls) == call:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(owner, name, call_and_signal)


def last_error_line(capsys) -> str:
    """The last line a command wrote on stderr, checked to come without a traceback before it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err  # one line, not a traceback before it
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def refused_in_one_line(argv: list[str], out: Path, capsys) -> str:
    """`run.py argv --output-dir out` refused as a mistake: exit status 2, one line on stderr (given
    back), and nothing written in `out`."""
    import run

    assert run.main([*argv, "--output-dir", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not out.exists() or not any(out.iterdir())
    return lines[0]


# --- metrics.jsonl ---------------------------------------------------------------------------------


def metrics(output_dir) -> list[dict]:
    """Every record of a run's metrics.jsonl, in file order."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def losses(output_dir) -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl (the end-of-run evaluation's line has no loss)."""
    return {record["step"]: record["loss"] for record in metrics(output_dir) if "loss" in record}


# --- runs in other processes -----------------------------------------------------------------------


def wait_for_first_log_line(proc: subprocess.Popen, output_dir: Path, timeout: float = 240) -> None:
    """Wait until the run `proc` has logged its first step (its slow steps, see signals.py's
    SLOW_STEP_ENV, start after it), then one second more: into step 2."""
    deadline = time.monotonic() + timeout
    path = Path(output_dir) / "metrics.jsonl"
    while not path.is_file() or not path.read_text().strip():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run did not reach step 1"
        time.sleep(0.2)
    time.sleep(1)


def signal_after_first_log_line(proc: subprocess.Popen, output_dir: Path, send, timeout: float) -> tuple[str, float]:
    """Once the run `proc` (started in a session of its own) is into step 2, `send()` it a signal.
    Returns the run's output and the seconds from the signal to the run's end. However the test goes,
    a run still there is killed with its whole session (the launcher and its workers), not left behind."""
    try:
        wait_for_first_log_line(proc, output_dir)
        sent = time.monotonic()
        send()
        output = proc.communicate(timeout=timeout)[0]
        return output, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def batch_of(tokenizer, rows: int = 3) -> dict:
    """`rows` rows of 16 tokens, the first 4 unsupervised: a batch for the tiny model's tests."""
    rows = [{"input_ids": list(range(5, 21)), "labels": [-100] * 4 + list(range(9, 21))} for _ in range(rows)]
    return Collator(tokenizer.pad_token_id)(rows)


def with_trained_lora(model):
    """LoRA's B is zero at the start, where LoRA adds nothing: give it values, so that a lost,
    skipped or wrongly scaled LoRA product (or its dropout) would change the numbers."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def lora_layers(model) -> list:
    """The decoder layers' LoRA modules (each holds its adapters' dropouts)."""
    return [m for layer in decoder_layers(model) for m in layer.modules() if hasattr(m, "lora_dropout")]
