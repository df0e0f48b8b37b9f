"""Every command as careful as run.py (issue 30, items 11-13): input checks of generate and
evaluate, a closed pipe and a full disk on stdout, SIGTERM and a full TMPDIR while loading, odd
--config files, misleading messages."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import run
from tests.common import last_error_line
from yoda_raw import checkpoint, generate, model
from yoda_raw.errors import YodaError

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_RUN = ["--preset", "tiny", "--quant", "none", "--no-samples", "--max-steps", "1"]


@pytest.mark.parametrize(
    "option, message",
    [
        (["--seed", "-1"], "--seed must be in [0, 2**32)"),
        (["--temperature", "inf"], "--temperature must be 0 (greedy) or a finite number"),
        (["--temperature", "nan"], "--temperature must be 0 (greedy) or a finite number"),
    ],
)
def test_generate_refuses_bad_sampling_options_in_one_line(option, message, capsys):
    """Catches a --seed or --temperature that fails later with a traceback (numpy's seed range, a
    sampling distribution of NaN)."""
    assert generate.main(["--adapter", "nowhere", "a sentence", *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message) and err.count("\n") == 1, err


def test_generate_refuses_stdin_that_is_not_utf8():
    """Catches a UnicodeDecodeError traceback for a file in another encoding piped in."""
    args = generate.parse_args(["--adapter", "x"])
    with pytest.raises(YodaError, match="stdin is not UTF-8 text"):
        generate.read_sentences(args, io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8"))


def test_generate_refuses_stdin_whose_text_layer_hides_another_encoding():
    """Catches stdin decoded with surrogateescape (Python's choice under the C locale) passing a
    Latin-1 byte on to the tokenizer, which fails with a TypeError traceback."""
    args = generate.parse_args(["--adapter", "x"])
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n"), encoding="utf-8", errors="surrogateescape")
    with pytest.raises(YodaError, match="stdin is not UTF-8 text"):
        generate.read_sentences(args, stdin)


def test_a_max_new_tokens_beyond_the_context_is_refused_before_any_pass():
    """Catches evaluate --max-new-tokens 100000 refused only after the whole loss pass."""

    class Model:
        config = type("Config", (), {"max_position_embeddings": 4096})

    generate.check_context(4095, Model())
    with pytest.raises(YodaError, match="--max-new-tokens 100000 leaves no room"):
        generate.check_context(100000, Model())


def _inspect_command() -> list[str]:
    dataset = REPO_ROOT / "yoda_raw" / "tiny_yoda.jsonl"
    return [sys.executable, "-m", "yoda_raw.inspect", "--tokenizer", "tiny", "--dataset", str(dataset)]


def test_inspect_into_a_closed_pipe_or_a_full_disk(tmp_path):
    """Catches `inspect | head` ending in a BrokenPipeError traceback, and stdout on a full disk
    (here /dev/full) in an OSError traceback. The pipe's reader is gone before inspect writes (as
    `head` is once it has its lines): a reader still reading could take the whole output into the
    pipe's buffer, and inspect would never meet the closed pipe."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(_inspect_command(), stdout=write_end, stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == "", done.stderr
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with open("/dev/full", "w") as full:
        done = subprocess.run(_inspect_command(), stdout=full, stderr=subprocess.PIPE, text=True, env=env)
    assert done.returncode == 2 and done.stderr.startswith("error: no space left on device"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


def test_sigterm_while_loading_removes_the_random_weights(tmp_path, monkeypatch, capsys):
    """Catches a SIGTERM while --init random's weights are written or loaded leaving the temporary
    yoda_raw_random_* folder behind (gigabytes on a real config), and the status 130 of a Ctrl-C."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    real = model.random_model

    def random_model_then_sigterm(*args, **kwargs):
        built = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return built

    monkeypatch.setattr(model, "random_model", random_model_then_sigterm)
    assert run.main([*TINY_RUN, "--output-dir", str(tmp_path / "out")]) == 143
    assert last_error_line(capsys).startswith("error: interrupted")
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_full_tmpdir_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """Catches a full TMPDIR while writing --init random's weights ending in a traceback, with the
    half-written folder left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()

    def full(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", full)
    assert run.main([*TINY_RUN, "--output-dir", str(tmp_path / "out")]) == 2
    line = last_error_line(capsys)
    assert line.startswith("error: --init random: cannot write the random weights") and "TMPDIR" in line, line
    assert list((tmp_path / "tmp").iterdir()) == []


def test_config_files_that_are_not_utf8_or_not_files(tmp_path, capsys):
    """Catches a non-UTF-8 YAML file ending in a UnicodeDecodeError traceback, and --config naming a
    FIFO waiting forever for a writer."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"system_prompt: caf\xe9\n")
    assert run.main(["--preset", "tiny", "--config", str(latin)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert run.main(["--preset", "tiny", "--config", str(fifo)]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_a_dangling_symlink_output_dir_says_so(tmp_path, capsys):
    """Catches --output-dir naming a symbolic link to nothing reported as "File exists"."""
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    assert run.main([*TINY_RUN, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is a symbolic link to" in err and "does not exist" in err and "File exists" not in err, err


def test_a_missing_run_config_key_is_called_missing(tmp_path, tiny_config):
    """Catches a key missing from the checkpoint's run_config.json reported as `None there`."""
    path = tmp_path / "checkpoint-1"
    path.mkdir()
    (path / checkpoint.ADAPTER_FILE).write_bytes(b"")
    (path / "trainer_state.json").write_text(json.dumps({"step": 1}))
    saved = json.loads(tiny_config().to_json())
    del saved["lora_r"]
    (path / "run_config.json").write_text(json.dumps(saved))
    cfg = tiny_config(resume=str(path))
    with pytest.raises(YodaError, match=r"lora_r \(missing there"):
        checkpoint.check_checkpoint(cfg, 1)


# --- generate --merge: a temporary folder, renamed into place ----------------------------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_config):
    from accelerate.state import AcceleratorState

    from yoda_raw import train

    out = tmp_path_factory.mktemp("merge") / "adapter"
    AcceleratorState._reset_state(True)
    train.main(tiny_config(quant="none", eval_fraction=0.0, samples=False, max_steps=1, output_dir=str(out)))
    return out


def test_merge_into_an_unwritable_place_fails_before_loading(adapter, tmp_path, monkeypatch, capsys):
    """Catches an unwritable --merge folder found only after the (slow) load, with a traceback."""
    (tmp_path / "a_file").write_text("")

    def no_load(*args, **kwargs):
        raise AssertionError("loaded the model before checking the folder")

    monkeypatch.setattr(generate, "load_for_inference", no_load)
    assert generate.main(["--adapter", str(adapter), "--merge", str(tmp_path / "a_file" / "merged")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --merge") and "is a file, not a folder" in err and err.count("\n") == 1, err


def test_merge_on_a_full_disk_leaves_nothing_and_a_retry_works(adapter, tmp_path, monkeypatch, capsys):
    """Catches a full disk mid-merge ending in a traceback and leaving a half folder that blocks the
    retry ("is not empty")."""
    import transformers

    real = transformers.PreTrainedModel.save_pretrained

    def full(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "merged"
    assert generate.main(["--adapter", str(adapter), "--merge", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no merged folder, no temporary one
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", real)
    assert generate.main(["--adapter", str(adapter), "--merge", str(out)]) == 0
    assert (out / "config.json").is_file()


def test_two_merges_into_one_folder_do_not_both_succeed(adapter, tmp_path, monkeypatch, capsys):
    """Catches two merges into the same new folder both reporting success, their files mixed."""
    import transformers

    real = transformers.PreTrainedModel.save_pretrained
    out = tmp_path / "merged"

    def other_merge_finishes_first(self, folder, *args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("{}")  # the other merge's folder, renamed into place
        return real(self, folder, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", other_merge_finishes_first)
    assert generate.main(["--adapter", str(adapter), "--merge", str(out)]) == 2
    assert "another merge wrote it meanwhile" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_while_a_command_imports_is_one_line(signum):
    """Catches Ctrl-C in the first seconds of `python -m yoda_raw.COMMAND`, while torch and the
    other libraries import, ending in a KeyboardInterrupt traceback. The signal goes out as soon as
    `-X importtime` reports yoda_raw.quiet imported (the package's first import), so it lands while
    the command's libraries are still importing, on any machine."""
    command = [sys.executable, "-X", "importtime", "-m", "yoda_raw.generate", "--help"]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.rstrip().endswith("yoda_raw.quiet"):
            proc.send_signal(signum)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 128 + signum  # a SIGTERM's ended it silently
    said = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert said == ["error: interrupted while starting; nothing was done"], rest[-2000:]
