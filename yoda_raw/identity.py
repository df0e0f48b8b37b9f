"""What identifies the base model an adapter was trained on, recorded in run_config.json.

A LoRA adapter is a small correction to one particular set of base weights: on other weights it is
noise. The same `--model` can name other weights by another day (a folder whose files were
replaced, a Hub repository with a new commit), so a run records what it loaded, and a resume,
`generate` and `evaluate` refuse another base instead of training or translating on it silently:

- a local folder: the sha256 of its weight files' contents (names and bytes; reading them costs
  about a second per GB, 7 s for Phi-3-mini's 7.6 GB), remembered between commands (below);
- a Hub id: the repository and the commit its files came from;
- `--init random`: the seed, and the device kind it was drawn on (model.random_model draws on the
  GPU when there is one, so the same seed gives other weights on a CPU-only machine).

A folder's sha256 is remembered, as git's index remembers its files': `base-model-hashes.json` in
the cache (`$YODA_RAW_CACHE`, else `~/.cache/yoda_raw`) keeps, for each folder (its resolved
path), every weight file's name, size, mtime, ctime, inode and device beside the folder's sha256.
A command whose folder still shows exactly those takes the sha256 from there and reads nothing;
any difference, a file added or gone, and the files are read again. That is safe because changing
a file changes them: new bytes give a new mtime and ctime (a size too, mostly), a file replaced
by another (a copy, a download, a rename over it) another inode, another disk another device, and
setting the mtime back by hand (`touch -d`) still moves the ctime. What it cannot catch: bytes
rewritten in place at the same size with the mtime and the ctime both as they were, which takes
setting the system clock back, or a file system whose times do not move (some network and FUSE
mounts). A file whose mtime is under 2 s old is not remembered (it could change again within the
same clock tick, unseen: git's "racy" entries), nor a folder that changed while it was read. The
cache holds the last 256 folders stored. One that cannot be read (damaged, not a file) counts as
empty, and one that cannot be written costs one line of warning: neither stops a command, which
then reads the files as before. Hub ids and `--init random` read no files and are not cached.

With several processes the weights are read once a machine, not once a process
(`shared_base_model_identity`).
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object

from yoda_raw.errors import YodaError
from yoda_raw.errors import reason as error_reason
from yoda_raw.fetch import cache_dir
from yoda_raw.output import write_atomically

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
HASHES_FILE = "base-model-hashes.json"  # in the cache: remembered folders' sha256 (module docstring)
REMEMBERED_FOLDERS = 256  # the oldest stored go first
RACY_NS = 2_000_000_000  # a file changed this recently may change again unseen: not remembered


def base_model_identity(cfg, model_config) -> str:
    """e.g. `sha256:3f2a...`, `hub:microsoft/Phi-3-mini-4k-instruct@0a67737c...`, `random:seed=42:cpu`."""
    if cfg.init == "random":
        return f"random:seed={cfg.seed}:{'cuda' if torch.cuda.is_available() else 'cpu'}"
    folder = Path(cfg.model).expanduser()
    if folder.is_dir():
        return f"sha256:{remembered_weights_sha256(folder)}"
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


def remembered_weights_sha256(folder: Path) -> str:
    """weights_sha256(folder), taken from the cache when every weight file's stat is as it was then;
    else read, and stored unless a file changed while read or too recently (module docstring)."""
    started = time.time_ns()
    try:
        key = str(folder.resolve())
        before = weight_stats(folder)
    except OSError:
        return weights_sha256(folder)  # a file gone or unreadable: fails there as it always has
    remembered = read_hashes()
    entry = remembered.get(key)
    if isinstance(entry, dict) and entry.get("files") == before and is_sha256(entry.get("sha256")):
        return entry["sha256"]
    sha = weights_sha256(folder)
    try:
        unchanged = weight_stats(folder) == before
    except OSError:
        unchanged = False
    if unchanged and all(mtime_ns <= started - RACY_NS for _, _, mtime_ns, *_ in before):
        remembered.pop(key, None)  # stored last: the order of the file is the order of storing
        remembered[key] = {"files": before, "sha256": sha}
        write_hashes(dict(list(remembered.items())[-REMEMBERED_FOLDERS:]))
    return sha


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def weight_stats(folder: Path) -> list[list]:
    """[name, size, mtime_ns, ctime_ns, inode, device] of each weight file (of its target, for a
    link), as lists: what the cache's JSON gives back, to compare with ==."""
    stats = []
    for path in weight_files(folder):
        st = path.stat()
        stats.append([path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return stats


def weights_sha256(folder: Path) -> str:
    """The folder's digest: each weight file's name, a zero byte and its bytes, in name order, in
    one sha256 (checkpoints record it: the definition stays)."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(path.name.encode() + b"\0")
        add_file(digest, path)
    return digest.hexdigest()


def hashes_file() -> Path:
    return cache_dir() / HASHES_FILE


def read_hashes() -> dict:
    """The cache's folders, {resolved path: {"files": weight_stats, "sha256": ...}}, oldest first;
    empty when it is missing or cannot be read or parsed."""
    try:
        remembered = json.loads(hashes_file().read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return {}
    return remembered if isinstance(remembered, dict) else {}


def write_hashes(remembered: dict) -> None:
    """Replace the cache (a temporary file of this process's, renamed: two commands writing at once
    leave one's whole); a failure is a line of warning, the command goes on."""
    path = hashes_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(remembered), path.with_name(f".{path.name}.{os.getpid()}.partial"))
    except OSError as err:
        print(
            f"note: could not remember the base model's sha256 in {path} ({error_reason(err)}); "
            "its weights will be read again next time",
            file=sys.stderr,
        )


def is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


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
