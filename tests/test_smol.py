"""The smol preset: a real pretrained model (SmolLM2-135M-Instruct) learns Yoda speak on a CPU.

The learning test needs the converted model in the cache (`python -m yoda_raw.fetch smol`, which
CI's .ci/run does before the tests) and skips, saying so, without it. The other tests need nothing.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from yoda_raw import fetch
from yoda_raw.config import SMOL_SYSTEM_PROMPT, TINY_DATASET, Config, parse_config
from yoda_raw.errors import YodaError

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_preset_uses_the_fetched_model_else_the_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("YODA_RAW_CACHE", str(tmp_path))
    cfg = parse_config(["--preset", "smol"])
    assert cfg.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (cfg.quant, cfg.precision, cfg.lora_targets) == ("auto", "auto", [])  # settled per machine at start
    assert (cfg.epochs, cfg.lr, cfg.system_prompt) == (1, 2e-3, SMOL_SYSTEM_PROMPT)

    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    (tmp_path / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    assert parse_config(["--preset", "smol"]).model == str(tmp_path / "SmolLM2-135M-Instruct")


@pytest.mark.slow  # a process that imports the libraries and fails: eight seconds on 2 cores
def test_not_fetched_and_no_hub_says_how_to_fetch(tmp_path):
    """Where the Hub is out of reach and nothing was fetched, the one error line says what to run."""
    env = os.environ | {"YODA_RAW_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "run.py", "--preset", "smol", "--dataset", TINY_DATASET, "--output-dir", str(tmp_path)]
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "`python -m yoda_raw.fetch smol`" in last


@pytest.fixture(scope="module")
def smol_folder() -> Path:
    folder = fetch.model_dir("smol")
    if not (folder / "config.json").is_file():
        pytest.skip(f"{folder} not found: run `python -m yoda_raw.fetch smol` first (CI's .ci/run does)")
    return folder


def test_smol_template_masks_and_the_system_prompt_replaces_its_default(smol_folder):
    """SmolLM2's ChatML: the answer and its <|im_end|> are supervised, nothing else (not the newline
    after it). Without a system message the template writes its own 21-token one; the preset's
    short prompt takes its place."""
    from yoda_raw.chat import IGNORE, load_tokenizer, tokenize_conversation
    from yoda_raw.data import with_system_prompt

    tokenizer = load_tokenizer(str(smol_folder))
    pair = [{"role": "user", "content": "The stars are bright."}, {"role": "assistant", "content": "Bright, they are."}]
    plain = tokenize_conversation(tokenizer, pair)
    ours = tokenize_conversation(tokenizer, with_system_prompt(pair, SMOL_SYSTEM_PROMPT))
    for example in (plain, ours):
        supervised = [
            token for token, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE
        ]
        assert tokenizer.decode(supervised) == "Bright, they are.<|im_end|>"
    assert "named SmolLM" in tokenizer.decode(plain["input_ids"])
    assert "named SmolLM" not in tokenizer.decode(ours["input_ids"]) and SMOL_SYSTEM_PROMPT in tokenizer.decode(
        ours["input_ids"]
    )
    # The system turn's markers are the same; only the texts differ: 16 tokens of SmolLM's against ours.
    default_text = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    saved = len(tokenizer(default_text)["input_ids"]) - len(tokenizer(SMOL_SYSTEM_PROMPT)["input_ids"])
    assert len(plain["input_ids"]) - len(ours["input_ids"]) == saved > 0


def test_tutorial_without_a_gpu_points_to_the_smol_preset():
    import torch

    from yoda_raw.train import check_device

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the tutorial runs")
    with pytest.raises(YodaError, match=r"no CUDA GPU.*--preset smol.*python -m yoda_raw.fetch smol"):
        check_device(Config(), torch.device("cpu"))


@pytest.mark.slow
def test_smol_learns_yoda_speak_it_was_not_shown(smol_folder, tmp_path):
    """The real thing, small: 39 of yoda_raw's own pairs, 10 steps at the preset's lr (one
    conversation per row, 8 rows a step), then the 13 held-out pairs it never saw, translated by the
    base model and by base + adapter (benchmarks/results/cpu_smol/ has the full preset's measured run
    on the 720 pairs).
    A pipeline that trains on the wrong tokens, renders prompts other than training
    did, or saves or applies the adapter wrongly stays near the base model's chrF."""
    from yoda_raw.evaluate import compare
    from yoda_raw.train import main as train

    cfg = parse_config(
        [
            "--preset",
            "smol",
            "--model",
            str(smol_folder),
            "--dataset",
            TINY_DATASET,
            "--eval-fraction",
            "0.25",
            "--packing",
            "none",
            "--batch-size",
            "8",
            "--epochs",
            "2",
            "--lora-dropout",
            "0",
            "--no-gradient-checkpointing",  # 135M parameters: activations are small, recomputing them is not
            "--no-samples",
            "--no-auto-batch-size",
            "--logging-steps",
            "1",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert cfg.lr == 2e-3 and cfg.system_prompt == SMOL_SYSTEM_PROMPT  # the preset's own
    result = train(cfg)
    losses = [record["loss"] for record in result.fit.log]
    assert result.fit.steps == 10 and losses[-1] < losses[0] / 2

    held_out = result.held_out
    assert len(held_out) == 13 and all(c[0] == {"role": "system", "content": SMOL_SYSTEM_PROMPT} for c in held_out)
    results = compare(result.model, result.tokenizer, held_out, max_new_tokens=32, system_prompt=cfg.system_prompt)
    base, adapter = results["base"], results["adapter"]
    assert adapter["loss"] < base["loss"]
    assert adapter["chrf"] >= base["chrf"] + 25, (base["chrf"], adapter["chrf"], adapter["translations"])
