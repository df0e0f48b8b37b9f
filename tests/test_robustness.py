"""Robustness (issue 7): bad input fails in one line, outputs are never clobbered, resumes are checked,
Ctrl-C saves a resumable checkpoint, a NaN stops the run cleanly, and no secret or pickle leaks out.

CPU only, tiny preset with an unquantized base: each in-process run takes a few seconds.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rounding_tolerance
from safetensors.torch import load_file

import run
from tests.common import fresh_accelerator_state, last_error_line, losses, signal_at_call
from yoda_raw import checkpoint, train
from yoda_raw.errors import Interrupted, YodaError

REPO_ROOT = Path(__file__).resolve().parent.parent
FAKE_TOKEN = "hf_testtoken123"


# On top of the tiny preset (the tiny_config fixture): fp32, no quantization, no held-out set, a
# loss logged every step, 4 steps.
RUN_OPTIONS = {
    "tokenizer": "tiny",
    "quant": "none",
    "precision": "fp32",
    "eval_fraction": 0.0,
    "lora_dropout": 0.0,
    "samples": False,
    "auto_batch_size": False,
    "logging_steps": 1,
    "max_steps": 4,
}


# --- 1. one clear line and exit code 2 from run.py ------------------------------------------------

# (id, extra arguments, what the error line must mention). These fail on the options, or (--push-to-hub)
# on train.main's first check, before any data or model is loaded: a few seconds a process.
CLI_CASES = [
    ("unknown-option", ["--nope"], "--nope"),
    ("bad-choice", ["--precision", "fp8"], "fp8"),
    ("max-length-1", ["--max-length", "1"], "--max-length"),
    ("batch-size-0", ["--batch-size", "0"], "--batch-size"),
    ("push-without-token", ["--push-to-hub", "user/repo"], "--push-to-hub"),
]
# Failures found while loading data and model: through run.main in-process (the CLI's code path,
# without another torch + transformers import per case); a non-YodaError escaping would fail the test.
IN_PROCESS_CASES = [
    ("dataset-missing", ["--dataset", "./no_such_data.jsonl"], "no_such_data.jsonl"),
    ("model-missing", ["--model", "./nowhere"], "./nowhere"),
    ("max-length-over-context", ["--max-length", "999999"], "--max-length 999999"),
    ("unknown-lora-target", ["--lora-targets", "q_proj"], "q_proj"),
]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Start every CLI case at once (each spends seconds importing torch) and collect the results."""
    root = tmp_path_factory.mktemp("cli")
    hf_home = root / "hf_home"  # empty: no cached token
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1"}
    procs = {}
    for case_id, args, _ in CLI_CASES:
        argv = [
            sys.executable,
            "run.py",
            "--preset",
            "tiny",
            "--quant",
            "none",
            "--no-samples",
            "--output-dir",
            str(root / case_id),
            *args,
        ]
        procs[case_id] = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    results = {}
    for case_id, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[case_id] = (proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize("case_id, mention", [(c[0], c[2]) for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_error_is_one_line_and_exit_2(cli_runs, case_id, mention):
    """Catches an error that escapes as a traceback (or argparse's usage block without `error:` last),
    a wrong exit code, or a message that does not name the option at fault: unknown option, bad
    choice, out-of-range values, and --push-to-hub with no token (HF_TOKEN unset, empty HF_HOME)."""
    returncode, _, stderr = cli_runs[case_id]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error:"), stderr
    assert mention in lines[-1], lines[-1]


@pytest.mark.parametrize("args, mention", [c[1:] for c in IN_PROCESS_CASES], ids=[c[0] for c in IN_PROCESS_CASES])
def test_load_error_is_one_line_and_exit_2(tmp_path, capsys, args, mention):
    """Catches a missing dataset or model, a max_length longer than the model's context, or a LoRA
    target the model lacks surfacing as a traceback (an uncaught exception fails this test) instead
    of one `error:` line naming the path or option, with exit code 2."""
    argv = ["--preset", "tiny", "--quant", "none", "--no-samples", "--output-dir", str(tmp_path / "out"), *args]
    assert run.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:") and mention in lines[-1], lines


def test_resume_of_a_non_checkpoint_is_one_line(tmp_path, capsys):
    """Catches --resume of a folder that is not a checkpoint crashing with FileNotFoundError/KeyError
    (a traceback) instead of `error: --resume PATH: not a checkpoint`, exit 2. In-process through
    run.main: the same code path as the CLI, without paying another torch import."""
    not_a_checkpoint = tmp_path / "just_a_folder"
    not_a_checkpoint.mkdir()
    argv = [
        "--preset",
        "tiny",
        "--quant",
        "none",
        "--no-samples",
        "--max-steps",
        "1",
        "--output-dir",
        str(tmp_path / "out"),
        "--resume",
        str(not_a_checkpoint),
    ]
    assert run.main(argv) == 2
    last = last_error_line(capsys)
    assert last.startswith("error: --resume") and str(not_a_checkpoint) in last and "not a checkpoint" in last


# --- 2. an existing adapter is not overwritten ----------------------------------------------------


def test_existing_adapter_is_refused_unless_overwrite(tmp_path, tiny_config):
    """Catches a run that silently writes over an adapter already in --output-dir (losing a finished
    training), and an --overwrite that does not actually allow it."""
    adapter = tmp_path / checkpoint.ADAPTER_FILE
    adapter.write_bytes(b"an earlier run's adapter")
    before = adapter.stat().st_mtime_ns
    with pytest.raises(YodaError, match="already holds an adapter.*--overwrite"):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), max_steps=1))
    assert adapter.read_bytes() == b"an earlier run's adapter"
    assert adapter.stat().st_mtime_ns == before
    train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), max_steps=1, overwrite=True))
    assert adapter.read_bytes() != b"an earlier run's adapter"
    assert load_file(adapter)  # a real safetensors adapter now


# --- a straight 4-step run, checkpointing every step, shared by the tests below --------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_config):
    """One uninterrupted 4-step run with a checkpoint every step and HF_TOKEN set to a fake token."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("straight")
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = FAKE_TOKEN
    try:
        AcceleratorState._reset_state(True)
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(out), save_steps=1))
    finally:
        AcceleratorState._reset_state(True)
        if old is None:
            del os.environ["HF_TOKEN"]
        else:
            os.environ["HF_TOKEN"] = old
    return out


# --- 3. resuming with other settings --------------------------------------------------------------


def test_resume_with_other_settings_names_the_fields(straight, tmp_path, tiny_config):
    """Catches a resume that loads a checkpoint made with another lora_r / max_length (a shape error
    deep in peft, or worse a silent run on differently cut data) instead of refusing up front and
    naming the fields that differ."""
    cfg = tiny_config(
        RUN_OPTIONS, output_dir=str(tmp_path), resume=str(straight / "checkpoint-2"), lora_r=4, max_length=32
    )
    with pytest.raises(YodaError, match="other settings") as info:
        train.main(cfg)
    message = str(info.value)
    assert "lora_r (8 there, 4 now)" in message and "max_length (64 there, 32 now)" in message
    assert "lora_alpha" not in message  # only the fields that differ
    assert not (tmp_path / checkpoint.ADAPTER_FILE).exists()


# --- 4. Ctrl-C saves a checkpoint that resumes exactly --------------------------------------------


def test_sigint_saves_a_checkpoint_that_resumes_exactly(straight, tmp_path, monkeypatch, tiny_config):
    """Catches Ctrl-C killing the run mid-step with nothing saved (or a half-written checkpoint), a run
    that does not say it was interrupted, and a checkpoint whose resume does not continue with the
    straight run's losses. SIGINT is sent to this process from inside the loop, in step 2's forward
    and backward: fit's handler, installed in the main thread, abandons step 2 (signals.py) and saves
    step 1, from which the resumed run trains steps 2 to 4 as the straight run did."""
    signal_at_call(monkeypatch, train.EagerStep, "forward_backward", 2, signal.SIGINT, before=True)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(Interrupted, match="SIGINT: stopped after step 1") as info:
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(interrupted)))
    assert info.value.exit_code == 130
    monkeypatch.undo()
    checkpoint = interrupted / "checkpoint-1"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 1
    assert not list(interrupted.glob(".checkpoint-*")) and not (interrupted / "checkpoint-2").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    fresh_accelerator_state()
    resumed_out = tmp_path / "resumed"
    result = train.main(tiny_config(RUN_OPTIONS, output_dir=str(resumed_out), resume=str(checkpoint)))
    assert result.fit.steps == 4
    expected, got = losses(straight), losses(resumed_out)
    assert sorted(got) == [2, 3, 4]
    # Resumed on the same CPU from an exact state: within fp32 rounding of the tiny model's step (conftest).
    assert all(abs(got[step] - expected[step]) <= rounding_tolerance(expected[step]) for step in got), (got, expected)
    assert losses(interrupted) == {1: expected[1]}


# --- 5. a non-finite loss stops the run, keeping earlier checkpoints --------------------------------


def test_nan_loss_stops_with_step_and_keeps_checkpoints(tmp_path, monkeypatch, tiny_config):
    """Catches a NaN loss that trains on (NaN weights saved as the adapter and in checkpoints), an
    error that does not name the step, and a stop that writes a checkpoint of the poisoned step."""
    real_loss = train.token_loss_sum
    calls = []

    def nan_at_step_3(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "token_loss_sum", nan_at_step_3)
    with pytest.raises(train.NonFiniteLoss, match="step 3"):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), save_steps=1))
    assert isinstance(train.NonFiniteLoss(3), YodaError)
    assert sorted(p.name for p in tmp_path.glob("*checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    adapter = load_file(tmp_path / "checkpoint-2" / checkpoint.ADAPTER_FILE)
    assert adapter and all(torch.isfinite(t).all() for t in adapter.values())
    assert not (tmp_path / checkpoint.ADAPTER_FILE).exists()  # no final adapter from a failed run


# --- 6. save_total_limit ----------------------------------------------------------------------------


def test_save_total_limit_keeps_newest_complete_checkpoints(tmp_path, tiny_config):
    """Catches save_total_limit deleting the newest checkpoints instead of the oldest, sorting
    checkpoint-10 before checkpoint-9 as text, or leaving .partial folders behind."""
    options = dict(max_steps=10, save_steps=1, save_total_limit=2, logging_steps=5)
    train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path), **options))
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-10", "checkpoint-9"]
    for folder in tmp_path.glob("checkpoint-*"):
        for name in ("trainer_state.json", "run_config.json", checkpoint.ADAPTER_FILE, "optimizer.bin"):
            assert (folder / name).is_file(), folder / name


# --- 7. security --------------------------------------------------------------------------------------


def test_weights_are_safetensors_only(straight):
    """Catches model weights saved as pickles (pytorch_model.bin, adapter_model.bin, *.pt): loading
    those runs arbitrary code. Accelerate's optimizer.bin and random_states_*.pkl are optimizer/RNG
    state, not weights, and stay in checkpoints only; the final output folder has no pickle at all,
    and no file holds the whole (base) model."""
    weight_pickles = [
        p
        for p in straight.rglob("*")
        if p.suffix in (".pt", ".pth", ".ckpt")
        or (p.suffix == ".bin" and p.name != "optimizer.bin")
        or (p.suffix == ".pkl" and not p.name.startswith("random_states_"))
    ]
    assert not weight_pickles
    assert not [p for p in straight.iterdir() if p.suffix in (".bin", ".pkl", ".pt", ".pth")]
    assert not list(straight.rglob("model*.safetensors"))
    for folder in [straight, *straight.glob("checkpoint-*")]:
        assert (folder / checkpoint.ADAPTER_FILE).is_file(), folder


def test_hf_token_is_never_written(straight):
    """Catches the HF token (here a fake one in HF_TOKEN) leaking into run_config.json, metrics.jsonl
    or any other file written by a run: those get shared and uploaded with the adapter."""
    written = [p for p in straight.rglob("*") if p.is_file()]
    assert any(p.name == "run_config.json" for p in written) and any(p.name == "metrics.jsonl" for p in written)
    leaks = [p for p in written if FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks
