"""Robustness, round 2 (issue 14): settings that make no sense are refused before anything starts,
damaged checkpoints and data are refused in one line, and a resume checks what it continues.

CPU only, tiny preset with an unquantized base: each in-process run takes a few seconds.
"""

import json
import shutil
from pathlib import Path

import pytest
from test_robustness import RUN_OPTIONS

import run
from tests.common import last_error_line
from yoda_raw import meter, train
from yoda_raw.checkpoint import ADAPTER_FILE
from yoda_raw.config import TINY_DATASET, Config
from yoda_raw.errors import YodaError

# --- numbers and types: one check in Config for the command line and YAML alike ------------------

# (id, command-line arguments, what the error line must name)
BAD_NUMBERS = [
    ("negative-clip", ["--max-grad-norm", "-1"], "--max-grad-norm"),
    ("negative-save-limit", ["--save-total-limit", "-1"], "--save-total-limit"),
    ("negative-seed", ["--seed", "-1"], "--seed"),
    ("seed-too-big", ["--seed", str(2**32)], "--seed"),
    ("infinite-lr", ["--lr", "inf"], "--lr"),
    ("nan-lr", ["--lr", "nan"], "--lr"),
    ("huge-lr", ["--lr", "1e38"], "--lr"),  # bitsandbytes' 8-bit AdamW overflowed: a traceback
    ("negative-weight-decay", ["--weight-decay", "-0.1"], "--weight-decay"),
    ("zero-alpha", ["--lora-alpha", "0"], "--lora-alpha"),
    ("nan-dropout", ["--lora-dropout", "nan"], "--lora-dropout"),
]


@pytest.mark.parametrize("args, mention", [c[1:] for c in BAD_NUMBERS], ids=[c[0] for c in BAD_NUMBERS])
def test_senseless_numbers_are_refused_in_one_line(tmp_path, capsys, args, mention):
    """Catches a clip norm of -1 that trains backwards, a save limit of -1 that deletes every
    checkpoint, a seed numpy cannot take (a traceback), an infinite learning rate that updates once
    before the NaN guard: each must be one `error:` line naming the option, exit 2, nothing written."""
    out = tmp_path / "out"
    assert run.main(["--preset", "tiny", "--output-dir", str(out), *args]) == 2
    line = last_error_line(capsys)
    assert line.startswith("error:") and mention in line, line
    assert not out.exists()


# (id, YAML text, what the error line must name)
BAD_YAML = [
    ("fractional-steps", "max_steps: 2.5\n", "--max-steps"),
    ("fractional-batch", "batch_size: 4.5\n", "--batch-size"),
    ("list-lr", "lr: [1, 2]\n", "--lr"),
    ("one-target-as-text", "lora_targets: o_proj\n", "--lora-targets"),
    ("bool-epochs", "epochs: true\n", "--epochs"),
    ("text-flag", "shuffle: maybe\n", "--shuffle"),
    ("unknown-choice", "optim: sgd\n", "--optim"),
    ("number-as-path", "dataset: 3\n", "--dataset"),
]


@pytest.mark.parametrize("text, mention", [c[1:] for c in BAD_YAML], ids=[c[0] for c in BAD_YAML])
def test_yaml_values_get_the_command_lines_checks(tmp_path, capsys, text, mention):
    """Catches YAML values that skip the command line's type checks: a step count of 2.5 or a list
    as the learning rate failing as a traceback after the model loaded, a lone target name taken as
    its letters (o, _, p, r, o, j), `epochs: true` taken as 1."""
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    assert run.main(["--preset", "tiny", "--config", str(config), "--output-dir", str(out)]) == 2
    line = last_error_line(capsys)
    assert line.startswith("error:") and mention in line, line
    assert not out.exists()


def test_good_yaml_values_keep_their_types(tmp_path):
    """Catches the type check refusing what is fine: a whole number for a float option, a list of
    targets, a null for an optional path."""
    config = tmp_path / "good.yaml"
    config.write_text("lr: 1\nlora_targets: [o_proj, qkv_proj]\ntokenizer: null\nmax_grad_norm: 0\n")
    cfg = run.parse_config(["--preset", "tiny", "--config", str(config)])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.lora_targets == ["o_proj", "qkv_proj"] and cfg.tokenizer is None and cfg.max_grad_norm == 0.0


def test_config_checks_types_when_built_directly():
    """The same check holds for Config built in code (tests, benchmarks, run_config.json)."""
    with pytest.raises(YodaError, match="--batch-size must be a whole number"):
        Config(batch_size=4.5)
    with pytest.raises(YodaError, match="--lora-targets must be a list"):
        Config(lora_targets="o_proj")


def test_resume_past_max_steps_is_refused(tmp_path, tiny_config, capsys):
    """Catches a resume from a checkpoint past --max-steps that trains nothing and exits 0 without a
    word. One at the last step (a run whose final save failed) writes the final adapter, saying so."""
    train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path / "run"), max_steps=2, save_steps=2))
    resume = str(tmp_path / "run" / "checkpoint-2")
    with pytest.raises(YodaError, match=r"at step 2 and this run ends at step 1 \(--max-steps 1\), so nothing is left"):
        train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path / "past"), max_steps=1, resume=resume))
    result = train.main(tiny_config(RUN_OPTIONS, output_dir=str(tmp_path / "at"), max_steps=2, resume=resume))
    assert result.fit.steps == 2 and (tmp_path / "at" / ADAPTER_FILE).is_file()
    assert "the checkpoint is at the run's last step; writing the final adapter" in capsys.readouterr().out


# --- damaged checkpoints: refused in one line before the model loads -------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory, tiny_config):
    """A 2-step run with a checkpoint at step 2, on a copy of the tiny data (tests change the copy)."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("made")
    data = root / "data.jsonl"
    shutil.copy(TINY_DATASET, data)
    AcceleratorState._reset_state(True)
    train.main(tiny_config(RUN_OPTIONS, output_dir=str(root / "run"), max_steps=2, save_steps=2, dataset=str(data)))
    AcceleratorState._reset_state(True)
    return root


def damaged_copy(made: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(made / "run" / "checkpoint-2", copy)
    return copy


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = [
    ("truncated-adapter", lambda c: truncate(c / ADAPTER_FILE), f"{ADAPTER_FILE} is damaged"),
    ("garbage-state", lambda c: (c / "trainer_state.json").write_text("{step: 2"), "trainer_state.json is damaged"),
    ("empty-state", lambda c: (c / "trainer_state.json").write_text(""), "trainer_state.json is damaged"),
    ("list-state", lambda c: (c / "trainer_state.json").write_text("[2]"), "trainer_state.json is damaged"),
    ("missing-optimizer", lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    ("truncated-optimizer", lambda c: truncate(c / "optimizer.bin"), "optimizer.bin is damaged"),
    ("missing-run-config", lambda c: (c / "run_config.json").unlink(), "run_config.json is missing"),
    ("corrupt-rng", lambda c: (c / "random_states_0.pkl").write_bytes(b"\0" * 100), "random_states_0.pkl is damaged"),
]


@pytest.mark.parametrize("damage, mention", [d[1:] for d in DAMAGES], ids=[d[0] for d in DAMAGES])
def test_damaged_checkpoint_is_refused_in_one_line(made, tmp_path, damage, mention, tiny_config):
    """Catches a damaged checkpoint (truncated adapter or optimizer file, garbage or empty
    trainer_state.json, a missing file) failing as a traceback deep in safetensors, json or torch,
    and a corrupt random-state file that Accelerate skips silently (the resumed losses then differ
    from an uninterrupted run's): each must be one YodaError naming the file and what to do."""
    copy = damaged_copy(made, tmp_path)
    damage(copy)
    cfg = tiny_config(
        RUN_OPTIONS, output_dir=str(tmp_path / "out"), max_steps=4, dataset=str(made / "data.jsonl"), resume=str(copy)
    )
    with pytest.raises(YodaError, match="damaged|missing") as error:
        train.main(cfg)
    assert mention in str(error.value) and "another checkpoint" in str(error.value)
    assert "\n" not in str(error.value)


def test_damaged_checkpoint_without_hashes_is_one_line(made, tmp_path, tiny_config):
    """A checkpoint saved before file hashes were recorded, with a truncated optimizer file: Accelerate's
    load fails inside torch; that must still be one line, not a traceback."""
    copy = damaged_copy(made, tmp_path)
    state = json.loads((copy / "trainer_state.json").read_text())
    del state["files"]
    (copy / "trainer_state.json").write_text(json.dumps(state))
    truncate(copy / "optimizer.bin")
    cfg = tiny_config(
        RUN_OPTIONS, output_dir=str(tmp_path / "out"), max_steps=4, dataset=str(made / "data.jsonl"), resume=str(copy)
    )
    with pytest.raises(YodaError, match="cannot load it") as error:
        train.main(cfg)
    assert "\n" not in str(error.value)


def test_resume_with_another_optimizer_is_refused(made, tmp_path, tiny_config):
    """Catches `KeyError: 'exp_avg'` from loading 8-bit AdamW's state into torch's AdamW."""
    cfg = tiny_config(
        RUN_OPTIONS,
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        dataset=str(made / "data.jsonl"),
        optim="adamw",
        resume=str(made / "run" / "checkpoint-2"),
    )
    with pytest.raises(YodaError, match=r"other settings: optim \('paged_adamw_8bit' there, 'adamw' now\)"):
        train.main(cfg)


# --- the tokenizer and the data are the ones the checkpoint (or adapter) was made with ---------------


def test_resume_with_another_tokenizer_is_refused(made, tmp_path, tiny_tokenizer, tiny_config):
    """Catches a resume with another --tokenizer (same vocabulary size, another chat template here)
    that continues training on other token ids (the loss jumps)."""
    other = tmp_path / "tokenizer"
    tiny_tokenizer.save_pretrained(other)
    config_file = other / "tokenizer_config.json"
    if (other / "chat_template.jinja").exists():
        template = other / "chat_template.jinja"
        template.write_text(template.read_text().replace("<|end|>", "<|end|> "))
    else:
        values = json.loads(config_file.read_text())
        values["chat_template"] = values["chat_template"].replace("<|end|>", "<|end|> ")
        config_file.write_text(json.dumps(values))
    cfg = tiny_config(
        RUN_OPTIONS,
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        dataset=str(made / "data.jsonl"),
        tokenizer=str(other),
        resume=str(made / "run" / "checkpoint-2"),
    )
    with pytest.raises(YodaError, match="is not the one the checkpoint was trained with"):
        train.main(cfg)


def test_resume_on_changed_data_is_refused(made, tmp_path, tiny_config):
    """Catches a resume that compares the data by path only: the same file, reordered, is other
    data (other rows per step, another held-out split)."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(reversed((made / "data.jsonl").read_text().splitlines(keepends=True))))
    cfg = tiny_config(
        RUN_OPTIONS,
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        dataset=str(data),
        resume=str(tmp_path / "checkpoint-2"),
    )
    shutil.copytree(made / "run" / "checkpoint-2", tmp_path / "checkpoint-2")
    run_config = tmp_path / "checkpoint-2" / "run_config.json"
    run_config.write_text(run_config.read_text().replace(str(made / "data.jsonl"), str(data)))
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    del state["files"]  # the edit above would otherwise be reported as damage
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(YodaError, match="has changed since the checkpoint"):
        train.main(cfg)


def test_evaluate_refuses_a_changed_data_file(tmp_path, tiny_config):
    """Catches evaluate re-splitting a reordered file and scoring training rows as "held-out"."""
    from yoda_raw.evaluate import conversations_to_score
    from yoda_raw.generate import read_run_config

    data = tmp_path / "data.jsonl"
    shutil.copy(TINY_DATASET, data)
    train.main(
        tiny_config(RUN_OPTIONS, output_dir=str(tmp_path / "run"), max_steps=1, eval_fraction=0.2, dataset=str(data))
    )
    cfg = read_run_config(tmp_path / "run")
    assert len(conversations_to_score(cfg)[0]) >= 1  # unchanged: fine
    data.write_text("".join(reversed(data.read_text().splitlines(keepends=True))))
    with pytest.raises(YodaError, match="has changed since the adapter was trained"):
        conversations_to_score(cfg)


# --- data that cannot be decoded: one line from run.py and from inspect ------------------------------


def _parquet_bytes() -> bytes:
    import io

    import pyarrow
    import pyarrow.parquet

    buffer = io.BytesIO()
    pyarrow.parquet.write_table(pyarrow.table({"sentence": ["Hi."], "translation_extra": ["Hi, I say."]}), buffer)
    return buffer.getvalue()


UNDECODABLE = [
    (
        "latin-1-jsonl",
        "data.jsonl",
        '{"sentence": "Caf\xe9", "translation_extra": "Caf\xe9, it is."}\n'.encode("latin-1"),
        "not UTF-8",
    ),
    ("binary-jsonl", "data.jsonl", bytes(range(256)) * 4, "not UTF-8"),
    ("latin-1-csv", "data.csv", "sentence,translation_extra\nCaf\xe9,Caf\xe9 it is\n".encode("latin-1"), "not UTF-8"),
    ("corrupt-parquet", "data.parquet", b"PAR1" + b"\0" * 100, "cannot read it as .parquet"),
    ("truncated-parquet", "data.parquet", _parquet_bytes()[:-20], "cannot read it as .parquet"),
]


@pytest.mark.parametrize("name, content, mention", [u[1:] for u in UNDECODABLE], ids=[u[0] for u in UNDECODABLE])
def test_undecodable_data_is_one_line(tmp_path, capsys, name, content, mention):
    """Catches a non-UTF-8 or binary data file, or a damaged .parquet, failing as a traceback
    (UnicodeDecodeError, ArrowInvalid) in run.py and in inspect, instead of one line naming the file."""
    from yoda_raw import inspect

    path = tmp_path / name
    path.write_bytes(content)
    assert run.main(["--preset", "tiny", "--dataset", str(path), "--output-dir", str(tmp_path / "out")]) == 2
    line = last_error_line(capsys)
    assert line.startswith(f"error: {path}: {mention}"), line
    assert inspect.main(["--tokenizer", "tiny", "--dataset", str(path)]) == 2
    assert last_error_line(capsys).startswith(f"error: {path}: {mention}")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_utf8_with_byte_order_mark_is_read(tmp_path, suffix):
    """Catches a UTF-8 file with a byte-order mark (Excel, Notepad) failing as `missing field 'sentence'
    (the row has: \\ufeffsentence, ...)` or as invalid JSON on its first line."""
    from yoda_raw.data import load_conversations

    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        text = 'sentence,translation_extra\nHi.,"Hi, I say."\n'
    else:
        text = json.dumps({"sentence": "Hi.", "translation_extra": "Hi, I say."}) + "\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_conversations(str(path)) == [
        [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hi, I say."}]
    ]


# --- generate, evaluate and inspect: every failure is one line, found before the slow part ------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_config):
    """A finished 1-step tiny run with 20% held out: an adapter folder as run.py leaves it."""
    from accelerate.state import AcceleratorState

    out = tmp_path_factory.mktemp("adapter") / "run"
    AcceleratorState._reset_state(True)
    train.main(tiny_config(RUN_OPTIONS, output_dir=str(out), max_steps=1, eval_fraction=0.2))
    AcceleratorState._reset_state(True)
    return out


def adapter_copy(adapter: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    return copy


ADAPTER_DAMAGES = [
    ("truncated-weights", lambda a: truncate(a / ADAPTER_FILE), f"{ADAPTER_FILE} is damaged"),
    ("no-weights", lambda a: (a / ADAPTER_FILE).unlink(), f"no {ADAPTER_FILE}"),
    ("garbage-run-config", lambda a: (a / "run_config.json").write_text("lr: 3"), "run_config.json is damaged"),
]


@pytest.mark.parametrize("damage, mention", [d[1:] for d in ADAPTER_DAMAGES], ids=[d[0] for d in ADAPTER_DAMAGES])
@pytest.mark.parametrize("tool", ["generate", "evaluate"])
def test_damaged_adapter_is_one_line(adapter, tmp_path, capsys, tool, damage, mention):
    """Catches a truncated adapter, a folder with adapter_config.json but no weights (peft then takes
    the path for a Hub id) and a garbage run_config.json failing as tracebacks in generate and evaluate."""
    from yoda_raw import evaluate, generate

    copy = adapter_copy(adapter, tmp_path)
    damage(copy)
    if tool == "generate":
        assert generate.main(["--adapter", str(copy), "Hello."]) == 2
    else:
        assert evaluate.main(["--adapter", str(copy)]) == 2
    line = last_error_line(capsys)
    assert line.startswith("error:") and mention in line, line


BAD_TOOL_ARGS = [
    ("generate", ["--device", "tpu9", "Hello."], "--device tpu9"),
    ("generate", ["--device", "cuda:7", "Hello."], "--device cuda:7"),
    ("generate", ["--max-new-tokens", "5000", "Hello."], "more than the model's context"),
    ("generate", ["x " * 3000], "more than the model's context"),
    ("evaluate", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("evaluate", ["--device", "tpu9"], "--device tpu9"),
    ("evaluate", ["--output-dir", "{file}"], "is a file, not a folder"),
]


@pytest.mark.parametrize(
    "tool, args, mention", BAD_TOOL_ARGS, ids=[f"{t}-{i}" for i, (t, *_) in enumerate(BAD_TOOL_ARGS)]
)
def test_bad_tool_arguments_are_one_line(adapter, tmp_path, capsys, tool, args, mention):
    """Catches an unknown --device, a prompt (with --max-new-tokens) longer than the model's context,
    evaluate's --max-new-tokens 0 raised only after the loss pass, and an --output-dir that is a file
    found only after the whole evaluation (its results lost): each one line, exit 2."""
    from yoda_raw import evaluate, generate

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    args = [arg.replace("{file}", str(a_file)) for arg in args]
    main = generate.main if tool == "generate" else evaluate.main
    assert main(["--adapter", str(adapter), *args]) == 2
    line = last_error_line(capsys)
    assert line.startswith("error:") and mention in line, line
    assert a_file.read_text() == "mine"


@pytest.mark.parametrize("target", ["file", "folder"])
def test_merge_onto_something_there_is_refused(adapter, tmp_path, capsys, target):
    """Catches --merge onto an existing file (a traceback) or into a folder of the user's files
    (replaced by the merged model's)."""
    from yoda_raw import generate

    there = tmp_path / "there"
    if target == "file":
        there.write_text("mine")
    else:
        there.mkdir()
        (there / "README.md").write_text("mine")
    assert generate.main(["--adapter", str(adapter), "--merge", str(there)]) == 2
    assert last_error_line(capsys).startswith(f"error: --merge {there}")
    assert (there if target == "file" else there / "README.md").read_text() == "mine"  # left alone


@pytest.mark.parametrize("args, mention", [(["--limit", "-2"], "--limit"), (["--max-length", "1"], "--max-length")])
def test_inspect_refuses_senseless_numbers(capsys, args, mention):
    """Catches `inspect --limit -2` showing all rows but two, and a max length that cannot hold a token pair."""
    from yoda_raw import inspect

    assert inspect.main(["--tokenizer", "tiny", "--dataset", TINY_DATASET, *args]) == 2
    line = last_error_line(capsys)
    assert line.startswith("error:") and mention in line, line


# --- Ctrl-C at any moment, and a Hub that cannot be reached: one line --------------------------------


def run_argv(out: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--quant", "none", "--precision", "fp32", "--max-steps", "2", "--logging-steps", "1",
            "--output-dir", str(out), *extra]  # fmt: skip


def test_ctrl_c_while_loading_is_one_line(tmp_path, capsys, monkeypatch):
    """Catches Ctrl-C during the (slow) model load ending in a KeyboardInterrupt traceback."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_base_model", interrupted)
    assert run.main(run_argv(tmp_path / "out", "--no-samples")) == 130
    assert last_error_line(capsys).startswith("error: interrupted")


def test_ctrl_c_during_the_end_of_run_evaluation_is_one_line(tmp_path, capsys, monkeypatch):
    """Catches Ctrl-C during the end-of-run evaluation ending in a traceback; the line says the adapter is saved."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "end_of_run_report", interrupted)
    out = tmp_path / "out"
    assert run.main(run_argv(out, "--eval-fraction", "0.2")) == 130
    line = last_error_line(capsys)
    assert line.startswith("error: interrupted during the end-of-run evaluation") and str(out) in line
    assert (out / ADAPTER_FILE).is_file()


def test_second_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    """Catches a second Ctrl-C (the first asks for a checkpoint after the step; the second stops at
    once) ending in a KeyboardInterrupt traceback."""
    import os
    import signal

    real_log_window = meter.log_window

    def two_sigints(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return real_log_window(*args, **kwargs)

    monkeypatch.setattr(meter, "log_window", two_sigints)
    assert run.main(run_argv(tmp_path / "out", "--no-samples")) == 130
    assert last_error_line(capsys).startswith("error: interrupted; stopped at once")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_push_to_hub_without_network_stops_before_training(tmp_path, capsys, monkeypatch):
    """Catches --push-to-hub with a token but no Hub to reach (here: offline mode) training, saving,
    then failing with a traceback: the Hub is asked once, before anything starts."""
    monkeypatch.setenv("HF_TOKEN", "hf_testtoken123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    assert run.main(run_argv(out, "--no-samples", "--push-to-hub", "user/repo")) == 2
    line = last_error_line(capsys)
    assert line.startswith("error: --push-to-hub user/repo: cannot reach the Hugging Face Hub"), line
    assert "hf_testtoken123" not in line and not out.exists()


def test_push_to_hub_failing_after_training_is_one_line(tmp_path, capsys, monkeypatch):
    """Catches the network going away during the run: the upload fails with one line that says the
    adapter is saved and how to upload it later."""
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_testtoken123")
    monkeypatch.setattr(huggingface_hub, "whoami", lambda *args, **kwargs: {"name": "user"})

    def no_network(*args, **kwargs):
        raise ConnectionError("Connection refused")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    out = tmp_path / "out"
    assert run.main(run_argv(out, "--no-samples", "--push-to-hub", "user/repo")) == 2
    line = last_error_line(capsys)
    assert "the upload failed (Connection refused)" in line and f"hf upload user/repo {out}" in line, line
    assert (out / ADAPTER_FILE).is_file()


def test_hand_edited_run_config_names_the_file(adapter, tmp_path, capsys):
    """Catches a run_config.json whose values are the wrong type failing as a traceback, or as an
    error about a command-line option the user never gave."""
    from yoda_raw import generate

    copy = adapter_copy(adapter, tmp_path)
    values = json.loads((copy / "run_config.json").read_text()) | {"max_length": "sixty-four"}
    (copy / "run_config.json").write_text(json.dumps(values))
    assert generate.main(["--adapter", str(copy), "Hello."]) == 2
    line = last_error_line(capsys)
    assert line.startswith(f"error: {copy / 'run_config.json'}: --max-length must be a whole number"), line


def test_checkpoint_folder_with_another_tokenizer_is_refused(adapter, tmp_path, capsys):
    """A checkpoint folder holds no tokenizer, so generate loads the run's --tokenizer source; when
    that no longer is the tokenizer the run trained with, the ids would mean other words."""
    from yoda_raw import generate

    copy = adapter_copy(adapter, tmp_path)
    for name in copy.glob("tokenizer*"):
        name.unlink()
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    values = json.loads((copy / "run_config.json").read_text()) | {"tokenizer_sha256": "0" * 64}
    (copy / "run_config.json").write_text(json.dumps(values))
    assert generate.main(["--adapter", str(copy), "Hello."]) == 2
    assert "is not the one it was trained with" in last_error_line(capsys)
