"""A resume (and generate, evaluate) trusts only what it checked (issue 30, items 3-8): the base
model's weights, the output folder against the checkpoint, an --overwrite that fails, the live
branch after a resume from an older checkpoint, unreadable random states, empty and `~` paths."""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import run
from tests.common import PLAIN_RUN, fresh_accelerator_state
from yoda_raw import output, train
from yoda_raw.checkpoint import ADAPTER_FILE
from yoda_raw.config import Config
from yoda_raw.errors import Interrupted, YodaError
from yoda_raw.identity import base_model_identity

OPTIONS = PLAIN_RUN | {"tokenizer": "tiny", "init": "pretrained", "max_steps": 2, "save_steps": 1}


def save_tiny_base(folder: Path, seed: int) -> None:
    """The tiny Phi-3 with random weights (seeded), saved as a local model folder."""
    import torch

    from yoda_raw import tiny
    from yoda_raw.model import random_model

    random_model(tiny.model_config(len(tiny.build_tokenizer())), seed, torch.float32).save_pretrained(folder)


@pytest.fixture(autouse=True, scope="module")
def _cache_in_tmp(tmp_path_factory):
    """The cache, where identity remembers the base folders' sha256, in a temporary folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("YODA_RAW_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_config):
    """A 2-step run on a local base folder, with checkpoint-1, checkpoint-2 and the final adapter."""
    root = tmp_path_factory.mktemp("trust")
    save_tiny_base(root / "base", seed=1)
    fresh_accelerator_state()
    train.main(tiny_config(OPTIONS, model=str(root / "base"), output_dir=str(root / "run")))
    return root


def copy_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The base folder the run recorded (shared: put back if changed), and a copy of the run."""
    shutil.copytree(trained / "run", tmp_path / "run")
    return trained / "base", tmp_path / "run"


# --- 3. the base model is recorded and checked ---------------------------------------------------------


def test_the_base_model_is_recorded_and_other_weights_are_refused(trained, tmp_path, tiny_config):
    """Catches a resume, generate or evaluate on other weights behind the same --model folder: the
    adapter trained on one base applied to another, silently (exit 0, other losses)."""
    from yoda_raw.generate import load_for_inference

    base, run_dir = copy_run(trained, tmp_path)
    recorded = json.loads((run_dir / "run_config.json").read_text())["base_model_id"]
    assert recorded.startswith("sha256:")
    load_for_inference(run_dir, "cpu")  # the same weights: accepted
    save_tiny_base(base, seed=2)  # other weights, same folder
    try:
        resume = tiny_config(OPTIONS, model=str(base), output_dir=str(run_dir), overwrite=True)
        fresh_accelerator_state()
        with pytest.raises(YodaError, match="the base model .* is not the one it was trained on"):
            train.main(dataclasses.replace(resume, resume=str(run_dir / "checkpoint-1")))
        with pytest.raises(YodaError, match=f"--adapter {run_dir}: the base model"):
            load_for_inference(run_dir, "cpu")
    finally:
        save_tiny_base(base, seed=1)


def test_base_identity_of_a_hub_id_and_random_init(tiny_config):
    """Catches a Hub model recorded without its commit (a new commit would pass) and a random base
    recorded without its seed."""
    hub = tiny_config(model="someone/model", init="pretrained")
    assert base_model_identity(hub, SimpleNamespace(_commit_hash="abc123")) == "hub:someone/model@abc123"
    assert base_model_identity(tiny_config(seed=7), None).startswith("random:seed=7:")


def test_several_processes_read_the_base_weights_once_a_machine(trained, monkeypatch, tiny_config):
    """A process that is not its machine's first takes the identity the first one read: catches every
    process reading the base's weights (a resume on N processes reading Phi-3's 7.6 GB N times), and
    machines whose copies differ passing unnoticed (each would train for another base)."""
    from yoda_raw import identity

    cfg = tiny_config(OPTIONS, model=str(trained / "base"))
    first = identity.base_model_identity(cfg, None)
    reads = []
    monkeypatch.setattr(identity, "weights_sha256", lambda folder: reads.append(folder) or "read here")
    second = SimpleNamespace(num_processes=2, is_local_main_process=False)
    # All processes' answers, the first machine's first process first (as gather_object returns them).
    monkeypatch.setattr(identity, "gather_object", lambda mine: [first, *mine])
    assert identity.shared_base_model_identity(cfg, None, second) == first and reads == []
    other_machine = "sha256:" + "0" * 64
    monkeypatch.setattr(identity, "gather_object", lambda mine: [first, *mine, other_machine])
    with pytest.raises(YodaError, match="the machines of this run hold other weights under that name"):
        identity.shared_base_model_identity(cfg, None, second)


# --- 3b. a folder's sha256 is remembered between commands -------------------------------------------------

HOUR_AGO_NS = time.time_ns() - 3600 * 10**9  # older than identity.RACY_NS: such files are remembered


@pytest.fixture
def hash_cache(tmp_path, monkeypatch) -> Path:
    """The cache (YODA_RAW_CACHE) in tmp_path, never the user's; gives the hashes file's path."""
    monkeypatch.setenv("YODA_RAW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "base-model-hashes.json"


def weights_folder(folder: Path, files: dict[str, bytes]) -> Path:
    """A --model folder of small 'weight' files (and a config.json, which is not hashed), written an
    hour ago as far as their mtimes say."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    for name, data in files.items():
        (folder / name).write_bytes(data)
        os.utime(folder / name, ns=(HOUR_AGO_NS, HOUR_AGO_NS))
    return folder


def counting_reads(monkeypatch) -> list[str]:
    """The names of the files identity reads from now on."""
    from yoda_raw import identity

    reads, add_file = [], identity.add_file
    monkeypatch.setattr(identity, "add_file", lambda digest, path: reads.append(path.name) or add_file(digest, path))
    return reads


def test_a_folders_sha256_is_remembered_and_means_what_it_meant(hash_cache, tmp_path, monkeypatch, tiny_config):
    """Catches every command reading the whole base again (7 s for Phi-3-mini's 7.6 GB), and a cache
    that changes what `sha256:...` means (checkpoints recorded the old definition: names, a zero byte
    and bytes, in name order, in one digest)."""
    folder = weights_folder(tmp_path / "base", {"b.safetensors": b"bee" * 1000, "a.safetensors": b"ay"})
    cfg = tiny_config(model=str(folder), init="pretrained")
    reads = counting_reads(monkeypatch)
    first = base_model_identity(cfg, None)
    assert first == "sha256:" + hashlib.sha256(b"a.safetensors\0ay" + b"b.safetensors\0" + b"bee" * 1000).hexdigest()
    assert reads == ["a.safetensors", "b.safetensors"] and hash_cache.is_file()
    assert base_model_identity(cfg, None) == first and len(reads) == 2  # nothing read the second time
    # By another path to the same folder (a link): the same entry.
    (tmp_path / "link").symlink_to(folder)
    assert base_model_identity(tiny_config(model=str(tmp_path / "link"), init="pretrained"), None) == first
    assert len(reads) == 2


def test_a_changed_weight_file_is_read_again(hash_cache, tmp_path, monkeypatch, tiny_config):
    """Catches a remembered sha256 standing for other bytes: a file rewritten in place at the same
    size with its mtime set back by hand (the ctime moves), replaced, added or removed, or changed
    so recently that another change within the same clock tick would go unseen."""
    from yoda_raw import identity

    folder = weights_folder(tmp_path / "base", {"a.safetensors": b"one", "b.bin": b"two"})
    cfg = tiny_config(model=str(folder), init="pretrained")
    reads = counting_reads(monkeypatch)
    identities = [base_model_identity(cfg, None)]

    def replace_b() -> None:
        (folder / "new.bin").write_bytes(b"other")
        os.replace(folder / "new.bin", folder / "b.bin")

    changes = {
        "rewritten in place, same size and mtime": lambda: weights_folder(folder, {"a.safetensors": b"ONE"}),
        "replaced by another file": replace_b,
        "a file added": lambda: weights_folder(folder, {"c.pth": b"three"}),
    }
    for what, change in changes.items():
        time.sleep(0.05)  # past the kernel's coarse clock tick, so that the ctime moves
        change()
        read_before = len(reads)
        identities.append(base_model_identity(cfg, None))
        assert len(reads) > read_before, what
        assert identities[-1] not in identities[:-1], what
        assert identities[-1] == f"sha256:{identity.weights_sha256(folder)}", what
    # c.pth removed: as after the replacement, whose b.bin has a new mtime, so it is not remembered
    # and every command reads the folder again until b.bin is 2 s old.
    (folder / "c.pth").unlink()
    for _ in range(2):
        read_before = len(reads)
        assert base_model_identity(cfg, None) == identities[2]
        assert reads[read_before:] == ["a.safetensors", "b.bin"]


def test_a_damaged_or_unwritable_cache_never_fails_a_command(hash_cache, tmp_path, monkeypatch, capsys, tiny_config):
    """Catches a cache that stops a command (damaged JSON, a folder or a file in its place, a cache
    folder that cannot be created), one trusted although the files' stats differ, and one that
    grows without bound."""
    from yoda_raw import identity

    folder = weights_folder(tmp_path / "base", {"model.safetensors": b"weights"})
    cfg = tiny_config(model=str(folder), init="pretrained")
    right = f"sha256:{identity.weights_sha256(folder)}"
    hash_cache.parent.mkdir()
    key = str(folder.resolve())
    for damaged in [b"{not json", b"[1, 2]", json.dumps({key: {"files": 1}}).encode(), b"\xff\xfe not UTF-8"]:
        hash_cache.write_bytes(damaged)
        assert base_model_identity(cfg, None) == right
        assert json.loads(hash_cache.read_text())[key]["sha256"] == right.removeprefix("sha256:")  # repaired
    # An entry whose stats differ from the folder's is not trusted, whatever its sha256.
    entry = json.loads(hash_cache.read_text())
    entry[key]["files"][0][1] += 1  # another size
    entry[key]["sha256"] = "0" * 64
    hash_cache.write_text(json.dumps(entry))
    assert base_model_identity(cfg, None) == right
    assert capsys.readouterr().err == ""
    # Not a file, or a cache folder that cannot be made (a file in its place): one line, no error.
    hash_cache.unlink()
    hash_cache.mkdir()
    assert base_model_identity(cfg, None) == right
    shutil.rmtree(hash_cache.parent)
    hash_cache.parent.write_text("a file where the cache folder should be")
    assert base_model_identity(cfg, None) == right
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("note: could not remember") for line in lines)
    # The newest REMEMBERED_FOLDERS folders are kept.
    hash_cache.parent.unlink()
    monkeypatch.setattr(identity, "REMEMBERED_FOLDERS", 2)
    folders = [weights_folder(tmp_path / f"base{i}", {"model.safetensors": bytes([i])}) for i in range(3)]
    for other in folders:
        base_model_identity(tiny_config(model=str(other), init="pretrained"), None)
    assert list(json.loads(hash_cache.read_text())) == [str(other.resolve()) for other in folders[1:]]


# --- 4. the output folder is not the checkpoint resumed ------------------------------------------------


@pytest.mark.parametrize("inside", ["", "sub"], ids=["equal", "inside"])
def test_output_dir_in_the_resumed_checkpoint_is_refused(trained, tmp_path, capsys, inside):
    """Catches --overwrite with --output-dir equal to (or inside) the --resume checkpoint deleting its
    adapter and run_config.json, then failing to load it."""
    _, run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoint-1"
    before = sorted(p.name for p in checkpoint.iterdir())
    argv = ["--preset", "tiny", "--resume", str(checkpoint), "--output-dir", str(checkpoint / inside), "--overwrite"]
    assert run.main(argv) == 2
    assert "lies inside it" in capsys.readouterr().err
    assert sorted(p.name for p in checkpoint.iterdir()) == before


# --- 5. --overwrite keeps the old adapter until the new one is saved -------------------------------------


def test_an_interrupted_overwrite_keeps_the_old_adapter(trained, tmp_path, monkeypatch, tiny_config):
    """Catches --overwrite deleting the finished run's adapter as the new run starts: stopped, it
    leaves neither."""
    base, run_dir = copy_run(trained, tmp_path)
    old = (run_dir / ADAPTER_FILE).read_bytes()
    real, calls = train.learning_rate, []

    def sigint_at_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "learning_rate", sigint_at_step_2)
    fresh_accelerator_state()
    with pytest.raises(Interrupted):
        train.main(tiny_config(OPTIONS, model=str(base), max_steps=4, output_dir=str(run_dir), overwrite=True))
    assert (run_dir / ADAPTER_FILE).read_bytes() == old
    assert json.loads((run_dir / "run_config.json").read_text())["max_steps"] == 2  # the old adapter's own
    monkeypatch.undo()
    fresh_accelerator_state()
    train.main(tiny_config(OPTIONS, model=str(base), max_steps=3, output_dir=str(run_dir), overwrite=True))
    assert (run_dir / ADAPTER_FILE).read_bytes() != old
    assert json.loads((run_dir / "run_config.json").read_text())["max_steps"] == 3


# --- 6. resume advice follows the live branch -------------------------------------------------------------


def test_advice_names_the_live_branchs_checkpoint(tmp_path, tiny_config):
    """Catches the "continue it with --resume" advice naming the highest-numbered checkpoint, left
    from before a resume from an older one, instead of the live branch's newest."""
    out = tmp_path / "out"
    for step in (2, 3, 4):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    past = time.time() - 60
    for step in (3, 4):
        os.utime(out / f"checkpoint-{step}" / "trainer_state.json", (past, past))
    (out / "metrics.jsonl").write_text("")
    # The run resumed from checkpoint-2 in its own folder (and stopped before its next checkpoint).
    output.start(tiny_config(output_dir=str(out), resume=str(out / "checkpoint-2")), out)
    assert output.latest_checkpoint(out) == out / "checkpoint-2"
    with pytest.raises(YodaError, match=f"continue it with --resume {out / 'checkpoint-2'},"):
        output.check_run_state(tiny_config(output_dir=str(out)), out)


def test_the_live_branch_is_recorded_not_read_from_file_times(tmp_path, tiny_config):
    """A run saves checkpoints 2, 4, 6; a resume from checkpoint-2 with --save-steps 3 and
    --save-total-limit 2 saves 3 and 6. The live branch is 2, 3, 6: --save-total-limit deletes 2 and
    keeps the abandoned branch's 4 (not its to count). Catches the limit counting checkpoints by
    number (it kept 4 and deleted the live 3), and advice that follows file times: here a copy (or a
    coarse clock) leaves checkpoint-4's the newest time, and the advice must still name checkpoint-6."""
    out = tmp_path / "out"
    fresh_accelerator_state()
    train.main(tiny_config(PLAIN_RUN, output_dir=str(out), max_steps=6, save_steps=2))
    (out / ADAPTER_FILE).unlink()  # as if it had stopped after step 6
    fresh_accelerator_state()
    resumed = {"max_steps": 6, "save_steps": 3, "save_total_limit": 2, "resume": str(out / "checkpoint-2")}
    train.main(tiny_config(PLAIN_RUN, output_dir=str(out), **resumed))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]
    assert output.live_branch(out) == [out / "checkpoint-3", out / "checkpoint-6"]

    (out / ADAPTER_FILE).unlink()  # as if the resumed run had stopped after step 6
    future = time.time() + 60
    os.utime(out / "checkpoint-4" / "trainer_state.json", (future, future))
    with pytest.raises(YodaError, match=f"continue it with --resume {out / 'checkpoint-6'},"):
        output.check_run_state(tiny_config(output_dir=str(out)), out)


# --- 7. random states are read before training ---------------------------------------------------------------


def test_an_unreadable_random_state_without_hashes_is_refused(trained, tmp_path, tiny_config):
    """Catches a checkpoint from before per-file hashes, whose random states cannot be read, resuming
    silently and inexactly (Accelerate skips such a file)."""
    base, run_dir = copy_run(trained, tmp_path)
    checkpoint = run_dir / "checkpoint-1"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["files"]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    (checkpoint / "random_states_0.pkl").write_bytes(b"not a pickle")
    fresh_accelerator_state()
    cfg = tiny_config(OPTIONS, model=str(base), output_dir=str(run_dir), overwrite=True, resume=str(checkpoint))
    with pytest.raises(YodaError, match="random_states_0.pkl cannot be read"):
        train.main(cfg)


# --- 8. empty and ~ paths ---------------------------------------------------------------------------------------


def test_empty_resume_is_refused_and_tilde_is_expanded(tmp_path, monkeypatch, capsys):
    """Catches `--resume "$CKPT"` with CKPT unset training from scratch, and `--output-dir '~/x'`
    making a folder named `~`."""
    assert run.main(["--preset", "tiny", "--resume", "", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--resume is empty" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = Config(output_dir="~/x", resume="~/x/checkpoint-1")
    assert cfg.output_dir == str(tmp_path / "x") and cfg.resume == str(tmp_path / "x" / "checkpoint-1")
