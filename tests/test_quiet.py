"""A run's output holds what is about the run: the libraries' noise is switched off (yoda_raw/quiet.py)."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_plot import png_size

from yoda_raw import quiet

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a whole tiny run in its own process: ten seconds and more on 2 cores
def test_a_tiny_run_prints_no_library_warnings_and_leaves_a_plot(tmp_path):
    """run.py as a user starts it, in its own process (warning filters are per process): no
    FutureWarning, UserWarning or bitsandbytes kernel message on stderr, and metrics.png beside
    metrics.jsonl at the end. Catches quiet.py not imported first, a filter that no longer matches
    the library's words, and the plot hook dropped from run.py."""
    out = tmp_path / "out"
    argv = [sys.executable, "run.py", "--preset", "tiny", "--max-steps", "1", "--logging-steps", "1"]
    argv += ["--eval-fraction", "0", "--no-samples", "--output-dir", str(out)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    noise = [line for line in done.stderr.splitlines() if "Warning" in line or "gemm_4bit_forward" in line]
    assert noise == [], "\n".join(noise)
    assert png_size(out / "metrics.png")
    assert f"plotted loss, tokens/s and memory in {out / 'metrics.png'}" in done.stdout


def test_bitsandbytes_hub_kernel_message_is_dropped_and_others_kept(caplog):
    """The message bitsandbytes logs on CPUs with AVX512-BF16 (not every CPU can show it for real)
    is dropped at its logger; any other message of that logger still reaches the user."""
    quiet.install()
    logger = logging.getLogger(quiet.BNB_CPU_LOGGER)
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            "ValueError: ... Set trust_remote_code=True",
        )
        logger.warning("a 4-bit weight has an unexpected shape")
    assert [r.getMessage() for r in caplog.records] == ["a 4-bit weight has an unexpected shape"]


def test_only_the_named_warnings_are_filtered():
    """transformers' rename notices are ignored; the same words from the user's own code, and any
    other FutureWarning of transformers, are not."""
    message = "`gradient_checkpointing_enable` is deprecated and will be removed in v6."
    with warnings.catch_warnings(record=True) as caught:
        quiet.install()  # pytest collected this file inside a catch_warnings block of its own
        warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit(message, FutureWarning, "train.py", 1, module="my_training_script")
        warnings.warn_explicit(
            "`foo` is deprecated", FutureWarning, "modeling_utils.py", 2, module="transformers.modeling_utils"
        )
    assert [(str(w.message), w.filename) for w in caught] == [
        (message, "train.py"),
        ("`foo` is deprecated", "modeling_utils.py"),
    ]
