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
import subprocess
import sys
from pathlib import Path

import pytest

from yoda_raw.errors import YodaError

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")
TOLERANCE = 1e-5  # fp32 on both sides; only the order of the gradient sums differs (measured <= 1e-6)


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


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


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
    expected, got = _losses(one), _losses(two)
    assert [step for step, _ in got] == [1, 2, 3, 4], "one metrics.jsonl line per step, from the main process only"
    assert [step for step, _ in expected] == [1, 2, 3, 4]
    delta = max(abs(a - b) for (_, a), (_, b) in zip(expected, got, strict=True))
    assert delta <= TOLERANCE, {"1 process": expected, "2 processes": got}
    state = json.loads((two / "checkpoint-3" / "trainer_state.json").read_text())
    assert state == {"step": 3, "num_processes": 2}
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
    assert state == {"step": 1, "num_processes": 1}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state | {"num_processes": 2}))
    with pytest.raises(YodaError, match=r"made on 2 process\(es\), this run has 1") as error:
        train.main(config(output_dir=str(tmp_path / "resumed"), resume=str(checkpoint)))
    assert "\n" not in str(error.value)
