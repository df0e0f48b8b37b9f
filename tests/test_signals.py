"""Ctrl-C and SIGTERM during training (yoda_raw/signals.py): a signal mid-step abandons the step and
saves the last finished one, in time for `accelerate launch`'s SIGKILL 5 s later; the launcher's
SIGTERM that follows a Ctrl-C is the same request; a second real signal stops at once, with its status.
"""

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import run
from tests.common import (
    PLAIN_RUN,
    fresh_accelerator_state,
    last_error_line,
    losses,
    signal_after_first_log_line,
    signal_at_call,
)
from yoda_raw import checkpoint, train
from yoda_raw.errors import Interrupted

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")

# Dropout on: a resume is exact only if the abandoned step's draws from the RNG are undone.
OPTIONS = PLAIN_RUN | {"lora_dropout": 0.1}
# The same plain run through run.py's command line.
TINY_ARGV = "--preset tiny --quant none --no-samples --eval-fraction 0 --logging-steps 1 --max-steps 4".split()


def signal_after_a_forward(monkeypatch, call: int, signum: int) -> None:
    """`signum` right after the `call`-th micro-batch's forward (its dropout has drawn from the RNG),
    before its backward: in the middle of a step."""
    signal_at_call(monkeypatch, train, "token_loss_sum", call, signum)


def signal_as_saving_begins(monkeypatch, signum: int) -> None:
    """`signum` as the loop begins to save a checkpoint: a second signal."""
    signal_at_call(monkeypatch, train, "save_checkpoint", 1, signum, before=True)


def test_a_signal_mid_step_saves_the_last_finished_step_and_resumes_exactly(tmp_path, monkeypatch, tiny_config):
    """Catches a signal mid-step that waits for the step to finish (under accelerate launch, killed
    before it saves), a checkpoint that holds the unfinished step's update, and one whose random
    states are those after the abandoned step's dropout draws: the resumed run's losses would then
    differ from a straight run's."""
    straight = tmp_path / "straight"
    fresh_accelerator_state()
    train.main(tiny_config(OPTIONS, output_dir=str(straight)))

    signal_after_a_forward(monkeypatch, 3, signal.SIGTERM)  # step 3 (one micro-batch a step)
    stopped = tmp_path / "stopped"
    fresh_accelerator_state()
    with pytest.raises(Interrupted, match="SIGTERM: stopped after step 2") as info:
        train.main(tiny_config(OPTIONS, output_dir=str(stopped)))
    assert info.value.exit_code == 143
    assert sorted(p.name for p in stopped.glob("checkpoint-*")) == ["checkpoint-2"]
    assert json.loads((stopped / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2
    monkeypatch.undo()

    resumed = tmp_path / "resumed"
    fresh_accelerator_state()
    train.main(tiny_config(OPTIONS, output_dir=str(resumed), resume=str(stopped / "checkpoint-2")))
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == [3, 4]
    # Same process, same kernels, same order of operations: an exact resume gives the same fp32
    # numbers; 1e-6 leaves room only for the last bits, far below a dropout mask's effect (~1e-2).
    assert all(abs(got[step] - expected[step]) <= 1e-6 for step in got), (got, expected)
    assert losses(stopped) == {1: expected[1], 2: expected[2]}


def test_the_launchers_sigterm_after_ctrl_c_is_the_same_request(tmp_path, monkeypatch, capsys):
    """Catches the SIGTERM that `accelerate launch` sends its worker after a Ctrl-C (which reached
    the worker too) being taken as a second request: stopped at once, nothing saved."""
    signal_after_a_forward(monkeypatch, 2, signal.SIGINT)
    signal_as_saving_begins(monkeypatch, signal.SIGTERM)
    out = tmp_path / "out"
    assert run.main([*TINY_ARGV, "--output-dir", str(out)]) == 130
    last = last_error_line(capsys)
    assert last.startswith("error: SIGINT: stopped after step 1 and saved") and "--resume" in last, last
    assert (out / "checkpoint-1" / checkpoint.ADAPTER_FILE).is_file()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers given back


def test_a_second_sigterm_stops_at_once_with_sigterms_status(tmp_path, monkeypatch, capsys):
    """Catches a second SIGTERM (a scheduler insisting) exiting 130, as if Ctrl-C had stopped it: a
    shell or scheduler reads 143 as "terminated"."""
    signal_after_a_forward(monkeypatch, 2, signal.SIGTERM)
    signal_as_saving_begins(monkeypatch, signal.SIGTERM)
    out = tmp_path / "out"
    assert run.main([*TINY_ARGV, "--output-dir", str(out)]) == 143
    last = last_error_line(capsys)
    assert last.startswith("error: interrupted; stopped at once without saving"), last


def test_a_signal_in_the_first_step_says_nothing_was_saved(tmp_path, monkeypatch, tiny_config):
    """Catches a stop before any step finished naming a checkpoint-0 that does not exist."""
    signal_after_a_forward(monkeypatch, 1, signal.SIGINT)
    out = tmp_path / "out"
    fresh_accelerator_state()
    with pytest.raises(Interrupted, match="before any step finished, so nothing was saved"):
        train.main(tiny_config(OPTIONS, output_dir=str(out)))
    assert not list(out.glob("checkpoint-*"))


# --- under a real `accelerate launch` ------------------------------------------------------------------


def _launch(out: Path) -> subprocess.Popen:
    """`accelerate launch --cpu` of the tiny preset whose steps after the first take 60 s (a test hook
    in signals.py), in a session of its own: the test can signal its process group as a terminal does."""
    command = [str(ACCELERATE), "launch", "--cpu", "--num_processes", "1", "run.py", "--preset", "tiny"]
    command += ["--quant", "none", "--no-samples", "--eval-fraction", "0", "--logging-steps", "1"]
    command += ["--max-steps", "5", "--output-dir", str(out)]
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "YODA_RAW_TEST_SLOW_STEP": "60",
    }
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm-to-launcher", "ctrl-c-to-group"])
def test_under_accelerate_launch_a_signal_mid_step_saves_in_time(tmp_path, how):
    """Catches the launcher's SIGKILL, 5 s after it passes the signal on, killing a worker that waits
    for a long step to end (exit 137 or -9, no checkpoint), and Ctrl-C, which reaches the worker twice
    (SIGINT from the terminal, then the launcher's SIGTERM), stopping it at once without saving.
    Step 2 takes 60 s here: the worker must abandon it and save step 1 within the launcher's 5 s."""
    out = tmp_path / "out"
    proc = _launch(out)
    if how == "sigterm-to-launcher":
        send = functools.partial(proc.send_signal, signal.SIGTERM)
    else:
        send = functools.partial(os.killpg, proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C
    output, took = signal_after_first_log_line(proc, out, send, timeout=60)
    name, status = ("SIGTERM", 143) if how == "sigterm-to-launcher" else ("SIGINT", 130)
    assert proc.returncode == status, output[-3000:]
    assert took < 5, f"{took:.1f} s: past the launcher's grace"
    assert (out / "checkpoint-1" / checkpoint.ADAPTER_FILE).is_file(), output[-3000:]
    assert not (out / "checkpoint-2").exists()
    assert f"error: {name}: stopped after step 1 and saved {out / 'checkpoint-1'}" in output, output[-3000:]
    assert "stopped at once" not in output, output[-3000:]


# --- several processes: one error line; the process count at start -----------------------------------------


def test_under_torchrun_only_rank_0_prints_a_stop(monkeypatch, capsys):
    """Catches every process of a multi-process run printing the same stop's line (once per rank):
    a stop the processes agreed on is said by rank 0 alone. (A mistake, status 2, is said by
    another rank too if rank 0 has not ended it first: tests/test_cli.py.)"""
    from yoda_raw.cli import run_command
    from yoda_raw.errors import Interrupted

    def command(argv):
        raise Interrupted("SIGTERM: stopped after step 3 and saved out/checkpoint-3", signal.SIGTERM)

    monkeypatch.setenv("RANK", "1")
    assert run_command(command, []) == 143
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert run_command(command, []) == 143
    assert capsys.readouterr().err == "error: SIGTERM: stopped after step 3 and saved out/checkpoint-3\n"


def test_the_run_says_how_many_processes_it_has(monkeypatch):
    """Catches `accelerate launch --cpu --num_processes 2` running one process without a word."""
    import torch

    from yoda_raw.launcher import one_process_hint

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert "--multi_gpu --num_processes N" in one_process_hint(1, torch.device("cpu"))
    assert one_process_hint(2, torch.device("cpu")) == ""
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert one_process_hint(1, torch.device("cpu")) == ""  # python run.py: one process, as asked
