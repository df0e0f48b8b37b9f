"""Robustness (issue 14): nothing a user already has in an output folder is replaced or lost, a run
owns its folder, writes fail in one line that says what is intact, and an interrupted run does not
look finished.

CPU only, tiny preset with an unquantized base. Refusals come before anything is loaded: those
tests make loading fail loudly, so a refusal that comes too late (or not at all) fails the test.
"""

import errno
import fcntl
import json
import os
import signal
from pathlib import Path

import peft.peft_model
import pytest
from safetensors import SafetensorError
from safetensors.torch import load_file

import run
from tests.common import PLAIN_RUN, last_error_line
from yoda_raw import checkpoint, meter, output, train
from yoda_raw.errors import Interrupted, YodaError

# On top of the tiny preset (the tiny_config fixture): fp32, no quantization, no held-out set, a
# loss logged every step, 4 steps.
RUN_OPTIONS = PLAIN_RUN


def steps(output_dir: Path) -> list[int]:
    """The step of every metrics.jsonl line, in file order."""
    return [json.loads(line)["step"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the lock file aside) and its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != output.LOCK_FILE
    }


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading the tokenizer (the first thing train.main loads) fails the test: refusals come first."""

    def fail(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the output folder was refused")

    monkeypatch.setattr(train, "load_tokenizer", fail)


def fake_finished_run(folder: Path) -> None:
    """What a finished run leaves (contents made up: only the names matter to the output folder)."""
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text('{"step": 2}')
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n{"step": 2, "loss": 6.0}\n')
    (folder / "run_config.json").write_text("{}")
    (folder / checkpoint.ADAPTER_FILE).write_bytes(b"a finished run's adapter")


def send_signal_at(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """Send `signum` to this process from inside the loop, as `step` begins (before its forward and
    backward, which a signal would abandon): the step finishes, then the run stops."""
    real_learning_rate, calls = train.learning_rate, []

    def learning_rate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real_learning_rate(*args, **kwargs)

    monkeypatch.setattr(train, "learning_rate", learning_rate_then_signal)


def disk_full_at_adapter_write(monkeypatch, n: int) -> None:
    """The n-th adapter write (checkpoints and the final save alike) fails as a full disk does."""
    real = peft.peft_model.safe_save_file
    calls = []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save)


# --- a run owns its output folder -------------------------------------------------------------------


def test_resume_does_not_open_a_finished_run_of_another_folder(tmp_path, nothing_loads, tiny_config):
    """Catches --resume switching off the protection of --output-dir: resuming another run's checkpoint
    into a folder that holds a finished adapter replaced the adapter, rewrote run_config.json and
    appended to metrics.jsonl (issue 14, item 1)."""
    (tmp_path / "other" / "checkpoint-4").mkdir(parents=True)
    finished = tmp_path / "finished"
    fake_finished_run(finished)
    before = snapshot(finished)
    cfg = tiny_config(RUN_OPTIONS, output_dir=str(finished), resume=str(tmp_path / "other" / "checkpoint-4"))
    with pytest.raises(YodaError, match="already holds an adapter.*--overwrite"):
        train.main(cfg)
    assert snapshot(finished) == before


def test_continuing_a_finished_run_in_its_folder_needs_overwrite(tmp_path, nothing_loads, tiny_config):
    """Catches a resume from an earlier checkpoint of a finished run, in that run's own folder,
    silently replacing the finished adapter."""
    fake_finished_run(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(YodaError, match="already holds an adapter.*--overwrite"):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), resume=str(tmp_path / "checkpoint-2")))
    assert snapshot(tmp_path) == before


def test_a_new_run_does_not_replace_a_stopped_run(tmp_path, nothing_loads, tiny_config):
    """Catches a new run (no --resume) in the folder of a killed run deleting its metrics.jsonl and
    writing over its checkpoints (issue 14, item 2); the refusal names the checkpoint to resume."""
    fake_finished_run(tmp_path)
    (tmp_path / checkpoint.ADAPTER_FILE).unlink()
    (tmp_path / "run_config.json").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(YodaError, match=f"--resume {tmp_path / 'checkpoint-2'}.*--overwrite"):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path)))
    assert snapshot(tmp_path) == before


def test_overwrite_starts_over_with_only_the_new_runs_checkpoints(tmp_path, tiny_config):
    """Catches --overwrite in a stopped run's folder keeping its metrics lines and its higher-numbered
    checkpoints, which --save-total-limit then kept in place of the new run's own (issue 14, item 2)."""
    fake_finished_run(tmp_path)
    (tmp_path / "checkpoint-9").mkdir()
    train.main(
        tiny_config(
            RUN_OPTIONS, output_dir=str(tmp_path), max_steps=3, save_steps=1, save_total_limit=2, overwrite=True
        )
    )
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert steps(tmp_path) == [1, 2, 3]
    assert load_file(tmp_path / checkpoint.ADAPTER_FILE)


def test_a_folder_in_use_by_another_run_is_refused(tmp_path, nothing_loads, tiny_config):
    """Catches two runs on one --output-dir at once interleaving metrics.jsonl and replacing each
    other's checkpoints (issue 14, item 3): the lock of a run in progress (here held by the test)
    stops the second one before it loads or writes anything."""
    tmp_path.joinpath("metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    with open(tmp_path / output.LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(YodaError, match="another run .*is writing to"):
            train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), resume=str(tmp_path / "checkpoint-1")))
    assert steps(tmp_path) == [1]


# --- files a run did not write are never replaced -----------------------------------------------------


def test_empty_output_dir_and_the_current_folder_are_refused(tmp_path, monkeypatch, nothing_loads, tiny_config):
    """Catches --output-dir "" (or ".") writing into the current folder: run from the project root it
    prepended peft's model card to the project's README.md (issue 14, item 4)."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# my project\n")
    monkeypatch.chdir(project)
    for name in ("", ".", str(project)):
        with pytest.raises(YodaError, match="--output-dir"):
            train.main(tiny_config(RUN_OPTIONS, output_dir=str(name)))
    assert snapshot(project) == {"README.md": b"# my project\n"}


def test_a_folder_of_other_files_is_refused_even_with_overwrite(tmp_path, nothing_loads, tiny_config):
    """Catches a run writing into a folder that is no run's (here a tokenizer's) and replacing
    README.md and tokenizer_config.json there: only the adapter file was protected (issue 14, item 4)."""
    (tmp_path / "README.md").write_text("my notes")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    for overwrite in (False, True):
        with pytest.raises(YodaError, match="README.md, tokenizer_config.json"):
            train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), overwrite=overwrite))
    assert snapshot(tmp_path) == {"README.md": b"my notes", "tokenizer_config.json": b"{}"}


def test_overwrite_keeps_a_readme_already_there(tmp_path, tiny_config):
    """Catches the final save replacing (or prepending peft's model card to) a README.md the user
    keeps in a run's folder."""
    fake_finished_run(tmp_path)
    (tmp_path / "README.md").write_text("my notes on this run")
    train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), max_steps=1, overwrite=True))
    assert (tmp_path / "README.md").read_text() == "my notes on this run"
    assert load_file(tmp_path / checkpoint.ADAPTER_FILE)


# --- the final save is whole or absent; a full disk says what is intact --------------------------------


def test_full_disk_at_the_final_save_leaves_no_adapter_and_resumes(tmp_path, tiny_config):
    """Catches a final save that a full disk cut short: an adapter with no run_config.json or tokenizer,
    which blocked a rerun and was refused by generate (issue 14, items 5 and 13). The error names the
    folder and the checkpoint to continue from; continuing from it then writes the whole adapter."""
    cfg = tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), max_steps=2, save_steps=2)
    with pytest.MonkeyPatch.context() as patch:
        disk_full_at_adapter_write(patch, 2)  # 1: checkpoint-2, 2: the final adapter
        with pytest.raises(YodaError, match=f"{tmp_path}.*No space left.*intact.*--resume {tmp_path / 'checkpoint-2'}"):
            train.main(cfg)
    assert not (tmp_path / checkpoint.ADAPTER_FILE).exists() and not (tmp_path / "run_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name or "partial" in p.name) == [
        "checkpoint-2"
    ]

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    train.main(
        tiny_config(
            RUN_OPTIONS, output_dir=str(tmp_path), max_steps=2, save_steps=2, resume=str(tmp_path / "checkpoint-2")
        )
    )
    for name in (checkpoint.ADAPTER_FILE, "adapter_config.json", "run_config.json", "tokenizer_config.json"):
        assert (tmp_path / name).is_file(), name
    assert steps(tmp_path) == [1, 2]


def test_full_disk_at_a_checkpoint_names_the_folder_and_the_intact_checkpoint(tmp_path, monkeypatch, tiny_config):
    """Catches a full disk during a checkpoint save surfacing as a traceback that names neither the
    folder nor that earlier checkpoints are intact (issue 14, item 13), and a half-written checkpoint
    left behind."""
    disk_full_at_adapter_write(monkeypatch, 2)
    with pytest.raises(YodaError) as info:
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), save_steps=1))
    message = str(info.value)
    assert str(tmp_path) in message and "checkpoint-2" in message and "No space left" in message
    assert f"intact; free some space, then continue with --resume {tmp_path / 'checkpoint-1'}" in message
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]


def test_full_disk_on_a_plain_write_is_one_line(tmp_path, monkeypatch, tiny_config):
    """Catches OSError (errno 28) from writing metrics.jsonl escaping as a traceback."""
    real_open = open

    def full_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(YodaError, match=f"metrics.jsonl.*{tmp_path}.*No space left") as error:
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), max_steps=1))
    assert "\n" not in str(error.value)


def test_save_total_limit_counts_only_the_runs_own_checkpoints(tmp_path, tiny_config):
    """Catches --save-total-limit counting any checkpoint-* folder: checkpoint-best raised after step 1,
    a user's checkpoint-4-backup displaced the run's own (issue 14, item 6), and a stale higher-numbered
    checkpoint (from before the resume) made it delete the checkpoint it had just written."""
    train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), max_steps=2, save_steps=1))
    (tmp_path / checkpoint.ADAPTER_FILE).unlink()  # as if it had been stopped at step 2
    for name in ("checkpoint-best", "checkpoint-4-backup", "checkpoint-9"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text("mine")

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    cfg = tiny_config(
        RUN_OPTIONS,
        output_dir=str(tmp_path),
        max_steps=4,
        save_steps=1,
        save_total_limit=1,
        resume=str(tmp_path / "checkpoint-2"),
    )
    train.main(cfg)
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert names == ["checkpoint-4", "checkpoint-4-backup", "checkpoint-9", "checkpoint-best"]
    assert (tmp_path / "checkpoint-best" / "keep.txt").read_text() == "mine"


# --- the output folder is checked before anything is loaded ---------------------------------------------


def test_output_dir_that_is_a_file_or_below_one_is_refused_first(tmp_path, nothing_loads, tiny_config):
    """Catches an --output-dir that is a file, or lies below a file, failing with a traceback after the
    model has loaded (issue 14, item 12). The file is left as it was."""
    a_file = tmp_path / "a_file"
    a_file.write_text("data")
    with pytest.raises(YodaError, match=f"--output-dir {a_file}: .*a file"):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(a_file)))
    with pytest.raises(YodaError, match=f"--output-dir {a_file / 'sub'}: {a_file} is a file"):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(a_file / "sub")))
    assert a_file.read_text() == "data"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_output_dir_is_refused_first(tmp_path, nothing_loads, tiny_config):
    """Catches an existing folder that cannot be written to training for steps, then dying (issue 14,
    item 12): it is refused before anything loads."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(YodaError, match=f"--output-dir {locked}: cannot write"):
            train.main(tiny_config(RUN_OPTIONS, output_dir=str(locked)))
        with pytest.raises(YodaError, match=f"--output-dir {locked / 'sub'}: cannot write"):
            train.main(tiny_config(RUN_OPTIONS, output_dir=str(locked / "sub")))
    finally:
        locked.chmod(0o700)


def test_a_failed_start_leaves_no_folder_behind(tmp_path, tiny_config):
    """Catches a run that stops on bad data leaving an empty output folder (the lock is taken early)."""
    with pytest.raises(YodaError, match="no_such_data"):
        train.main(
            tiny_config(
                RUN_OPTIONS, output_dir=str(tmp_path / "out" / "deeper"), dataset=str(tmp_path / "no_such_data.jsonl")
            )
        )
    assert not (tmp_path / "out").exists()


# --- interruption is not success; one metrics line per step ----------------------------------------------


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_exits_non_zero_and_does_not_look_finished(tmp_path, monkeypatch, capsys, signum, code):
    """Catches a run stopped by SIGINT or SIGTERM going on as if finished: writing the final adapter and
    a run_config.json, running the end-of-run evaluation, and exiting 0, so that a scheduler that
    preempts with SIGTERM saw success (issue 14, item 17). Exits 128 + the signal, as shells do, with
    one line that says how to resume."""
    send_signal_at(monkeypatch, 2, signum)
    argv = ["--preset", "tiny", "--quant", "none", "--logging-steps", "1", "--max-steps", "4"]
    assert run.main([*argv, "--eval-fraction", "0.1", "--output-dir", str(tmp_path)]) == code
    last = last_error_line(capsys)
    assert last.startswith("error:") and f"--resume {tmp_path / 'checkpoint-2'}" in last, last
    assert not (tmp_path / checkpoint.ADAPTER_FILE).exists() and not (tmp_path / "run_config.json").exists()
    assert steps(tmp_path) == [1, 2]  # no evaluation line
    assert (tmp_path / "checkpoint-2" / checkpoint.ADAPTER_FILE).is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_from_an_older_checkpoint_keeps_one_line_per_step(tmp_path, monkeypatch, tiny_config):
    """Catches metrics.jsonl holding the same steps twice after a resume from an older checkpoint
    (issue 14, item 18)."""
    send_signal_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), save_steps=2))
    assert steps(tmp_path) == [1, 2, 3]
    monkeypatch.undo()

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), save_steps=2, resume=str(tmp_path / "checkpoint-2")))
    assert steps(tmp_path) == [1, 2, 3, 4]


def test_a_signal_during_logging_saves_the_checkpoint_it_names(tmp_path, monkeypatch, tiny_config):
    """Catches a signal that comes while a step logs ending the run with no checkpoint of that step,
    and a resume hint naming a checkpoint that does not exist."""
    real_log_window = meter.log_window

    def log_window_then_sigint(window, step, *args, **kwargs):
        record = real_log_window(window, step, *args, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(meter, "log_window", log_window_then_sigint)
    with pytest.raises(Interrupted, match=f"--resume {tmp_path / 'checkpoint-2'}"):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path)))
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    assert steps(tmp_path) == [1, 2]
