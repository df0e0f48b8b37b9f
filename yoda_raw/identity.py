"""What identifies the base model an adapter was trained on, recorded in run_config.json.

A LoRA adapter is a small correction to one particular set of base weights: on other weights it is
noise. The same `--model` can name other weights by another day (a folder whose files were
replaced, a Hub repository with a new commit), so a run records what it loaded, and a resume,
`generate` and `evaluate` refuse another base instead of training or translating on it silently:

- a local folder: the sha256 of its weight files' contents (names and bytes; reading them costs
  about a second per GB, once a command);
- a Hub id: the repository and the commit its files came from;
- `--init random`: the seed, and the device kind it was drawn on (model.random_model draws on the
  GPU when there is one, so the same seed gives other weights on a CPU-only machine).

With several processes the weights are read once a machine, not once a process
(`shared_base_model_identity`).
"""

import hashlib
from pathlib import Path

import torch
from accelerate.utils import gather_object

from yoda_raw.errors import YodaError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def base_model_identity(cfg, model_config) -> str:
    """e.g. `sha256:3f2a...`, `hub:microsoft/Phi-3-mini-4k-instruct@0a67737c...`, `random:seed=42:cpu`."""
    if cfg.init == "random":
        return f"random:seed={cfg.seed}:{'cuda' if torch.cuda.is_available() else 'cpu'}"
    folder = Path(cfg.model).expanduser()
    if folder.is_dir():
        return f"sha256:{weights_sha256(folder)}"
    commit = getattr(model_config, "_commit_hash", None)  # set by from_pretrained for a Hub repository
    return f"hub:{cfg.model}@{commit}" if commit else f"hub:{cfg.model}"


def shared_base_model_identity(cfg, model_config, state) -> str:
    """base_model_identity, the same on every process of a run (`state`: Accelerate's PartialState).
    Each machine's first process reads the weights and the others get its answer: reading Phi-3's
    7.6 GB once a process would cost a resume on N processes N times the time. Machines whose copies
    differ are refused: their processes would train adapters for other bases, averaged as one."""
    mine = base_model_identity(cfg, model_config) if state.is_local_main_process else None
    # One process: gather_object gives back [mine] without any communication.
    found = sorted({identity for identity in gather_object([mine]) if identity is not None})
    if len(found) > 1:
        raise YodaError(
            f"--model {cfg.model}: the machines of this run hold other weights under that name "
            f"({', '.join(map(_short, found))}); give every machine the same copy"
        )
    return found[0]


def weights_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        digest.update(path.name.encode() + b"\0")
        add_file(digest, path)
    return digest.hexdigest()


def add_file(digest, path: Path) -> None:
    """Feed a file's bytes to a hashlib digest, a few MB at a time (weights run to gigabytes)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)


def check_base_model(saved: str | None, now: str, model: str, where: str, fix: str) -> None:
    """Refuse a base model other than the one recorded (`saved`; None: recorded by an earlier version)."""
    if saved is None or saved == now:
        return
    raise YodaError(
        f"{where}: the base model {model} is not the one it was trained on ({_short(saved)} there, "
        f"{_short(now)} now); {fix}"
    )


def _short(identity: str) -> str:
    kind, _, value = identity.partition(":")
    return f"{kind} {value[:12]}..." if kind == "sha256" else identity
