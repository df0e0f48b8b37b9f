"""Several processes (issue 8), checked on a CPU: 2 processes over gloo must train as 1 process does.

`accelerate launch --cpu` runs a single process whatever --num_processes says, so the 2-process runs
use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`: torchrun starts 2
processes and Accelerate joins them with the gloo backend on the CPU.

The base is the tiny preset's random Phi-3 (`--init random`): the main process writes it to a
temporary folder and every process loads it from there.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import rounding_tolerance

from tests.common import losses, metrics, signal_after_first_log_line
from yoda_raw.errors import YodaError

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _env() -> dict:
    return os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _options(out: Path, batch_size: int) -> list[str]:
    # 29 packed rows, shuffled (seeded): 2 steps an epoch, the second one short; 4 steps cross an epoch.
    return [
        "run.py",
        "--preset",
        "tiny",
        "--quant",
        "none",
        "--precision",
        "fp32",
        "--batch-size",
        str(batch_size),
        "--logging-steps",
        "1",
        "--max-steps",
        "4",
        "--lora-dropout",
        "0",
        "--eval-fraction",
        "0",
        "--no-samples",
        "--no-auto-batch-size",
        "--save-steps",
        "3",
        "--output-dir",
        str(out),
    ]


def _run(command: list[str]) -> None:
    done = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _start(command: list[str], **env: str) -> subprocess.Popen:
    """`command` running, in a session of its own: on failure the launcher and both workers are
    killed together (common.signal_after_first_log_line), not left behind."""
    return subprocess.Popen(
        command, cwd=REPO_ROOT, env=_env() | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip


def _sigterm_to_rank_1(proc: subprocess.Popen) -> None:
    """SIGTERM to the launch's rank-1 worker only (found by its RANK environment variable)."""
    os.kill(next(pid for pid in _descendants(proc.pid) if b"\0RANK=1\0" in _environ(pid)), signal.SIGTERM)


def _assert_resumed_as_straight(straight: Path, resumed: Path, steps: list[int]) -> None:
    """The resumed run logged `steps`, each loss within fp32 rounding of the straight run's there."""
    expected, got = losses(straight), losses(resumed)
    assert sorted(got) == steps
    assert all(abs(got[step] - expected[step]) <= rounding_tolerance(expected[step], steps=step) for step in got), (
        got,
        expected,
    )


@pytest.mark.slow  # three accelerate launches, two processes each: half a minute or more on 2 cores
@pytest.mark.parametrize("per_process", [8, 12], ids=["8+8,8+5", "12+12,5+none"])
def test_two_processes_give_one_process_losses(per_process, tmp_path):
    """2 processes x B rows give the per-step losses of 1 process x 2B rows (shuffled, same seed), over
    4 steps that cross an epoch boundary. The epoch's last global batch is short: 13 rows split 8+5
    (B=8), or 5 rows on rank 0 and none on rank 1 (B=12). Catches: Accelerate's even_batches padding
    the short batch with rows from the start of the epoch (rows trained twice, another loss); a loss
    normalised by one process's tokens instead of all processes'; DDP's gradient averaging left
    unscaled; step counts that differ between processes (a hang, here a timeout); a process left
    without rows skipping the gradient all-reduce; every process writing metrics.jsonl (duplicate
    lines); rank 1 not finding the random base that rank 0 wrote;
    and a bare PartialState() that ignores ACCELERATE_USE_CPU, making each process a lone
    "main" that trains on all the rows. Tolerance 1e-5 (fp32). ~25 s on 2 cores."""
    if not ACCELERATE.exists() and shutil.which("accelerate") is None:
        pytest.skip("the `accelerate` command is not installed next to this Python")
    accelerate = str(ACCELERATE if ACCELERATE.exists() else shutil.which("accelerate"))
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, *_options(one, 2 * per_process)])
    _run(
        [
            "env",
            "ACCELERATE_USE_CPU=1",
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--main_process_port",
            str(29500 + per_process),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--num_cpu_threads_per_process",
            "1",
            *_options(two, per_process),
        ]
    )
    # Every line, in file order: a line per step per process would show here as a step twice.
    expected, got = ([(r["step"], r["loss"]) for r in metrics(out)] for out in (one, two))
    assert [step for step, _ in got] == [1, 2, 3, 4], "one metrics.jsonl line per step, from the main process only"
    assert [step for step, _ in expected] == [1, 2, 3, 4]
    delta = max(abs(a - b) for (_, a), (_, b) in zip(expected, got, strict=True))
    # fp32 on both sides; only the order of the gradient sums differs (two halves all-reduced against
    # one sum): within fp32 rounding of the tiny model's step, once for each of the 4 (conftest).
    bound = rounding_tolerance(max(a for _, a in expected), steps=4)
    assert delta <= bound, {"1 process": expected, "2 processes": got}
    state = json.loads((two / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["step"], state["num_processes"]) == (3, 2)
    assert sorted(p.name for p in (two / "checkpoint-3").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


def test_resume_on_another_process_count_is_refused(tmp_path):
    """A checkpoint made on 2 processes, resumed on 1, stops with one line naming both numbers. Catches
    a resume that silently continues: rows are dealt to processes batch by batch, so the saved step
    points at other rows (and other random states) on another number of processes."""
    from accelerate.state import AcceleratorState

    from yoda_raw import train
    from yoda_raw.config import PRESETS, Config

    def config(**overrides) -> Config:
        return Config(
            **{
                "preset": "tiny",
                **PRESETS["tiny"],
                "precision": "fp32",
                "quant": "none",
                "eval_fraction": 0.0,
                "max_steps": 1,
                "save_steps": 1,
                "auto_batch_size": False,
                "samples": False,
                "output_dir": str(tmp_path / "run"),
                **overrides,
            }
        )

    train.main(config())
    AcceleratorState._reset_state(True)
    checkpoint = tmp_path / "run" / "checkpoint-1"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert (state["step"], state["num_processes"]) == (1, 1)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state | {"num_processes": 2}))
    with pytest.raises(YodaError, match=r"made on 2 process\(es\), this run has 1") as error:
        train.main(config(output_dir=str(tmp_path / "resumed"), resume=str(checkpoint)))
    assert "\n" not in str(error.value)


def _launch(port: int, options: list[str]) -> list[str]:
    if not ACCELERATE.exists() and shutil.which("accelerate") is None:
        pytest.skip("the `accelerate` command is not installed next to this Python")
    accelerate = str(ACCELERATE if ACCELERATE.exists() else shutil.which("accelerate"))
    return ["env", "ACCELERATE_USE_CPU=1", accelerate, "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", *options]  # fmt: skip


def _with(options: list[str], **changes) -> list[str]:
    """`options` with the value after each --NAME replaced (NAME with _ for -), or added."""
    options = list(options)
    for name, value in changes.items():
        flag = "--" + name.replace("_", "-")
        if flag in options:
            options[options.index(flag) + 1] = str(value)
        else:
            options += [flag, str(value)]
    return options


@pytest.mark.slow  # two two-process runs and a resume: about a minute on 2 cores
def test_each_process_draws_its_own_dropout_and_resumes_exactly(tmp_path):
    """With LoRA dropout on 2 processes, each process's RNG (which dropout draws from) is its own:
    the random states the checkpoint saves per process after step 1 differ. Catches every process
    drawing the same masks (seeded alike). Nothing else sets those states apart: a pretrained base (the
    tiny model saved to a folder) is loaded alike by every process, and step 1 gives each 8 rows (later,
    a short batch would consume less of one process's stream). A resume from step 2 then gives
    the straight run's losses at steps 3 and 4: each process gets its own stream back. ~1 min on 2 cores."""
    import torch
    import transformers

    from yoda_raw import tiny
    from yoda_raw.chat import load_tokenizer

    base = tmp_path / "base"
    transformers.set_seed(0)
    config = tiny.model_config(len(load_tokenizer("tiny")))
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(base)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    options = _with(
        _options(straight, 8), lora_dropout=0.1, save_steps=1, model=base, init="pretrained", tokenizer="tiny"
    )
    _run(_launch(29610, options))
    states = [
        torch.load(straight / "checkpoint-1" / f"random_states_{rank}.pkl", weights_only=False)["torch_manual_seed"]
        for rank in (0, 1)
    ]
    assert not torch.equal(states[0], states[1]), "both processes hold the same RNG state: the same dropout masks"
    _run(_launch(29611, _with(options, output_dir=resumed, resume=straight / "checkpoint-2")))
    _assert_resumed_as_straight(straight, resumed, [3, 4])


@pytest.mark.slow  # a two-process run stopped and checked: half a minute on 2 cores
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """A SIGTERM that reaches one process only (here rank 1, found by its RANK environment variable)
    stops both processes after the same step, with one checkpoint holding both processes' random
    states. Catches the signalled process stopping alone to save while the other waits for it in the
    next all-reduce (a hang: here the 180 s timeout)."""
    out = tmp_path / "out"
    proc = _start(_launch(29612, _with(_options(out, 8), max_steps=400, save_steps=0)))
    output = signal_after_first_log_line(proc, out, lambda: _sigterm_to_rank_1(proc), timeout=180)[0]
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, output[-3000:]
    step = json.loads((checkpoints[0] / "trainer_state.json").read_text())["step"]
    assert 1 <= step < 400 and checkpoints[0].name == f"checkpoint-{step}"
    assert sorted(p.name for p in checkpoints[0].glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert metrics(out)[-1]["step"] == step, "the last metrics line is the stopping step's"
    # Not success: the run says where it stopped, as SIGTERM, also on the process the signal missed.
    assert proc.returncode != 0 and f"error: SIGTERM: stopped after step {step}" in output, output[-3000:]


@pytest.fixture(scope="module")
def straight_with_dropout(tmp_path_factory) -> Path:
    """A two-process run of 3 steps, 4 micro-batches each, with LoRA dropout: what a stopped and
    resumed run must match."""
    out = tmp_path_factory.mktemp("straight")
    _run(_launch(29613, _with(_options(out, 2), **UNEVEN_STEPS)))
    return out


# 29 rows in micro-batches of 2 on 2 processes, 4 to a step: 16 rows a step. Step 2 ends the epoch
# with 4 micro-batches on rank 0 and 3 on rank 1, so the processes agree at 3 of its micro-batches.
UNEVEN_STEPS = {"grad_accum": 4, "lora_dropout": 0.1, "max_steps": 3, "save_steps": 0}


@pytest.mark.slow  # a two-process run stopped, then resumed: about a minute on 2 cores
@pytest.mark.parametrize("to", ["launcher", "rank 1"])
def test_a_signal_stops_two_processes_within_a_micro_batch_and_resumes_exactly(straight_with_dropout, tmp_path, to):
    """Two processes abandon a long step together at the next micro-batch and save the step before,
    whether the launcher passes SIGTERM to both (torchrun gives them 30 s, then SIGKILL) or it
    reaches rank 1 only (a `kill` by hand). Step 2 takes 12 s here (4 micro-batches of 3 s, a test
    hook in signals.py); the signal comes 1 s into it. Catches the processes finishing the step
    (stopping 11 s later: a real step of minutes would be killed with nothing saved), one process
    abandoning alone (the other hangs in the gradient all-reduce: here the timeout), agreements
    called a different number of times on the two processes, whose micro-batch counts differ in
    step 2 (a hang), and a checkpoint whose random states are those after the abandoned step's
    dropout draws on either process (the resumed losses would differ from the straight run's)."""
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    options = _with(_options(stopped, 2), **UNEVEN_STEPS)
    proc = _start(_launch(29614, options), YODA_RAW_TEST_SLOW_STEP="3")
    send = (lambda: proc.send_signal(signal.SIGTERM)) if to == "launcher" else (lambda: _sigterm_to_rank_1(proc))
    output, took = signal_after_first_log_line(proc, stopped, send, timeout=120)
    assert f"error: SIGTERM: stopped after step 1 and saved {stopped / 'checkpoint-1'}" in output, output[-3000:]
    # One micro-batch (3 s) and the save, not the 11 s left of the step.
    assert took < 8, f"{took:.1f} s after the signal: the step was not abandoned\n{output[-3000:]}"
    assert [p.name for p in stopped.glob("checkpoint-*")] == ["checkpoint-1"]

    _run(_launch(29615, _with(options, output_dir=resumed, resume=stopped / "checkpoint-1")))
    _assert_resumed_as_straight(straight_with_dropout, resumed, [2, 3])


def _descendants(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in _descendants(c)]


def _environ(pid: int) -> bytes:
    try:
        return b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""
