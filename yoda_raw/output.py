"""The output folder: a run owns it while it runs, never replaces what it did not write, and writes
its final adapter so that a crash or a full disk leaves the whole adapter or none.

What a run writes into `--output-dir`: `metrics.jsonl` (a line per logged step), `checkpoint-N`
folders, and at the end the adapter (`adapter_model.safetensors`, `adapter_config.json`), the
tokenizer, `run_config.json` and peft's model card (`README.md`). The adapter file marks a finished
run: `generate` and `evaluate` need everything else to be there when it is.

The rules, checked before anything is loaded (so a mistake costs seconds, not a model load):
- A folder that is not empty and holds nothing a run writes is refused, even with --overwrite: it
  is someone's project, or a model's or tokenizer's folder, whose README.md or tokenizer_config.json
  the final save would replace. So are "" and the current folder.
- A finished run's adapter is replaced only with --overwrite, also when --resume is given.
- A stopped run (checkpoints or metrics, no adapter) is continued with `--resume DIR/checkpoint-N`
  in its own folder; a new run there needs --overwrite, which deletes the stopped run's
  checkpoints and metrics first (otherwise they would mix with the new run's).
- One run at a time: a run holds an exclusive lock (flock) on `DIR/.yoda_raw.lock` until it ends.
  The operating system drops the lock when the process dies, even by `kill -9`, so a stale lock
  never blocks the next run.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError

from yoda_raw.config import Config
from yoda_raw.errors import YodaError

ADAPTER_FILE = "adapter_model.safetensors"
LOCK_FILE = ".yoda_raw.lock"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG = "run_config.json"
TRAINER_STATE = "trainer_state.json"  # in each checkpoint: its step, its files' hashes, its branch
TRACKER_DIR = "yoda_raw"  # --report-to tensorboard writes its event files here
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
PARTIAL_NAME = re.compile(r"\.(checkpoint-\d+|final)\.partial")
# What a full disk raises: open()/write() an OSError, torch.save a RuntimeError, safetensors its own.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def run_checkpoints(out: Path) -> dict[int, Path]:
    """The run's own checkpoint folders by step: `checkpoint-<int>` only, so that a user's
    `checkpoint-best` or `checkpoint-4-backup` is neither counted nor deleted."""
    if not out.is_dir():
        return {}
    matches = ((CHECKPOINT_NAME.fullmatch(p.name), p) for p in out.iterdir() if p.is_dir())
    return {int(m[1]): p for m, p in matches if m}


# --- the live branch of checkpoints -----------------------------------------------------------------
# After a resume from an older checkpoint, higher-numbered checkpoints of the abandoned branch remain
# until the new run reaches their numbers and replaces them. The advice to --resume and
# --save-total-limit must follow the branch in progress, so each checkpoint says where it belongs, in
# its trainer_state.json: `generation`, the run that saved it (1 + the highest generation in the
# folder when that run started), and `lineage`, the [step, generation] of its branch's checkpoints
# before it. A resumed checkpoint gets `continued_by`: the generation of the run that continued it.
# File times would be simpler, and wrong in a copied folder or on a clock coarser than a save.


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json; {} when it cannot be read (damaged, cut short)."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _number(state: dict, key: str) -> int:
    value = state.get(key, 0)
    return value if isinstance(value, int) else 0


def _rank(state: dict) -> int:
    """The latest run (generation) that saved or continued a checkpoint; 0 for one from before."""
    return max(_number(state, "generation"), _number(state, "continued_by"))


def _recency(path: Path, state: dict) -> tuple[int, float]:
    """What orders checkpoints by when their branch was last worked on: the latest run that saved or
    continued it; for checkpoints from before generations were recorded, their file time."""
    rank = _rank(state)
    if rank:
        return rank, 0.0
    with contextlib.suppress(OSError):
        return 0, (path / TRAINER_STATE).stat().st_mtime
    return 0, 0.0


def _lineage(state: dict, older: list[int]) -> set[tuple[int, int]]:
    """(step, generation) of the checkpoints before this one on its branch. A checkpoint from before
    lineages were recorded: the ones numbered below it (`older`), as they were counted then."""
    try:
        return {(int(step), int(generation)) for step, generation in state["lineage"]}
    except (KeyError, TypeError, ValueError):
        return {(step, 0) for step in older}


def live_branch(out: Path) -> list[Path]:
    """The checkpoints of the branch in progress, oldest first: the newest checkpoint of the latest
    run (by generation, then step) and the ones its lineage names."""
    found = {step: (path, checkpoint_state(path)) for step, path in run_checkpoints(out).items()}
    if not found:
        return []
    tip = max(found, key=lambda step: (*_recency(*found[step]), step))
    ancestors = _lineage(found[tip][1], [step for step in found if step < tip])
    return [
        path
        for step, (path, state) in sorted(found.items())
        if step == tip or (step, _number(state, "generation")) in ancestors
    ]


def latest_checkpoint(out: Path) -> Path | None:
    """The live branch's newest checkpoint: the one to continue (see live_branch)."""
    live = live_branch(out)
    return live[-1] if live else None


@dataclasses.dataclass
class Branch:
    """The branch a run saves its checkpoints on: its generation, and the lineage so far."""

    generation: int
    lineage: list[tuple[int, int]]  # (step, generation) of the branch's checkpoints, oldest first

    def place(self, step: int) -> dict:
        """trainer_state.json's fields for checkpoint-`step`, which joins the branch's lineage."""
        fields = {"generation": self.generation, "lineage": list(self.lineage)}  # JSON: [step, generation]
        self.lineage.append((step, self.generation))
        return fields


def new_branch(cfg: Config, out: Path) -> Branch:
    """This run's branch: a generation above every checkpoint in `out` and the resumed one, and the
    resumed checkpoint's lineage and itself. A checkpoint resumed in its own folder is marked as
    continued (`continued_by`), so that it is the live branch's newest until this run saves one."""
    states = [checkpoint_state(path) for path in run_checkpoints(out).values()]
    if not cfg.resume:
        return Branch(1 + max(map(_rank, states), default=0), [])
    resumed = Path(cfg.resume)
    state = checkpoint_state(resumed)
    generation = 1 + max(map(_rank, [*states, state]))
    older = [step for step in run_checkpoints(resumed.parent) if step < state["step"]]
    lineage = sorted(_lineage(state, older)) + [(state["step"], _number(state, "generation"))]
    if continues_here(cfg, out):
        continued = json.dumps(state | {"continued_by": generation}, indent=2)
        replace_text(resumed / TRAINER_STATE, continued, f"{resumed.name}/{TRAINER_STATE}", out)
    return Branch(generation, lineage)


def left_by_a_run(out: Path) -> list[str]:
    """Names in `out` that a run writes before it finishes (the lock file aside), sorted."""
    names = {METRICS_FILE, RUN_CONFIG, ADAPTER_FILE, TRACKER_DIR} | {p.name for p in run_checkpoints(out).values()}
    return sorted(p.name for p in out.iterdir() if p.name in names or PARTIAL_NAME.fullmatch(p.name))


def check_no_file_in_the_way(folder: Path, what: str, fix: str) -> None:
    """Refuse, in one line, a folder to write into that is a file or lies below one: making it would
    fail with "File exists" or "Not a directory", which names neither the file nor the way out.
    `what` names the folder as the user gave it (`--output-dir out`); `fix` says what to do instead.
    Every command that writes a folder (a run, `generate --merge`, `evaluate`, `fetch`) checks this."""
    folder = Path(folder).expanduser().absolute()
    a_file = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if a_file:
        where = "is a file" if a_file == folder else f"{a_file} is a file"
        raise YodaError(f"{what}: {where}, not a folder; {fix}")


# --- owning the folder ------------------------------------------------------------------------------


@contextlib.contextmanager
def owned(cfg: Config, state: PartialState) -> Iterator[Path]:
    """Check `cfg.output_dir` and hold its lock for the run; yields the folder as a Path.

    The main process checks and locks, then hands its verdict to the others (a broadcast), so that
    every process stops, or none does. A folder this made, and in which the run wrote nothing, is
    removed again at the end: a run that stopped on bad data leaves nothing behind.
    """
    out = Path(cfg.output_dir)
    lock, problem = None, None
    if state.is_main_process:
        try:
            lock = claim(cfg, out)
        except YodaError as err:
            problem = str(err)
        except OSError as err:  # a folder that cannot even be listed
            problem = f"--output-dir {out}: cannot use it ({err.strerror}); choose a folder you can write to"
    problem = broadcast_object_list([problem])[0]
    if problem:
        raise YodaError(problem)
    try:
        yield out
    finally:
        if lock:
            lock.release()


class Lock:
    """An exclusive flock on OUTPUT_DIR/.yoda_raw.lock, held until `release`. The file says which
    process holds it. `made` lists the folders that taking the lock created (deepest first). A run
    that wrote nothing (it stopped on a bad option or bad data) takes the lock file it made with it."""

    def __init__(self, out: Path, made: list[Path]):
        self.out, self.made = out, made
        self.made_file = not (out / LOCK_FILE).exists()
        self.fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 200).decode(errors="replace").strip() or "holder unknown"
            os.close(self.fd)
            raise YodaError(
                f"--output-dir {out}: another run ({holder}) is writing to it; "
                "wait for that run to end, or choose another --output-dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())

    def release(self) -> None:
        if (self.made or self.made_file) and [p.name for p in self.out.iterdir()] == [LOCK_FILE]:
            (self.out / LOCK_FILE).unlink()  # still held: no other run can have taken it meanwhile
            for folder in self.made:
                folder.rmdir()
        os.close(self.fd)  # drops the lock


def claim(cfg: Config, out: Path) -> Lock:
    """The checks of the module docstring, in order; returns the lock, or raises YodaError."""
    if not cfg.output_dir.strip():
        raise YodaError("--output-dir is empty; name a folder for the adapter, e.g. --output-dir out")
    if out.resolve() == Path.cwd().resolve():
        raise YodaError(
            f"--output-dir {cfg.output_dir} is the current folder; a run writes README.md, tokenizer and "
            "adapter files there: give it a folder of its own, e.g. --output-dir out"
        )
    if cfg.resume and out.resolve().is_relative_to(Path(cfg.resume).resolve()):
        raise YodaError(
            f"--output-dir {out} is the --resume checkpoint {cfg.resume} or lies inside it, and a run's saves "
            f"would destroy that checkpoint; pass its run's folder ({Path(cfg.resume).resolve().parent}) or a new one"
        )
    for path in [out, *out.parents]:
        if path.is_symlink() and not path.exists():
            raise YodaError(
                f"--output-dir {out}: {path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                "create that folder, remove the link, or choose another --output-dir"
            )
    check_no_file_in_the_way(out, f"--output-dir {out}", "choose a folder")
    if out.is_dir() and any(out.iterdir()) and not left_by_a_run(out) and not (out / LOCK_FILE).exists():
        others = sorted(p.name for p in out.iterdir())
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise YodaError(
            f"--output-dir {out} holds files that no run wrote ({listed}); the final save would replace "
            "files of the same names: choose a new or empty folder"
        )

    made = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # the lock file may exist already: try a new file
    except OSError as err:
        raise YodaError(
            f"--output-dir {out}: cannot write there ({err.strerror}); choose a folder you can write to"
        ) from None
    lock = Lock(out, made)

    try:
        check_run_state(cfg, out)
    except YodaError:
        lock.release()
        raise
    return lock


def continues_here(cfg: Config, out: Path) -> bool:
    """Whether this run resumes a checkpoint of `out` itself, continuing the run that made it."""
    return cfg.resume is not None and Path(cfg.resume).resolve().parent == out.resolve()


def check_run_state(cfg: Config, out: Path) -> None:
    """Refuse to replace a finished adapter without --overwrite, and to start over a stopped run."""
    if cfg.overwrite:
        return
    if (out / ADAPTER_FILE).exists():
        raise YodaError(
            f"{out} already holds an adapter; choose another --output-dir or pass --overwrite "
            "(which replaces it, and deletes the checkpoints of its run unless you --resume one of them)"
        )
    left = left_by_a_run(out)
    if left and not continues_here(cfg, out):
        newest = latest_checkpoint(out)
        resume = f"continue it with --resume {newest}, or " if newest else ""
        raise YodaError(
            f"--output-dir {out} holds a run that did not finish ({', '.join(left)}); {resume}start over "
            "there with --overwrite (which deletes what it left), or choose another --output-dir"
        )


def start(cfg: Config, out: Path) -> Branch:
    """Make the folder ready for this run (main process; the data and model are known good by now).

    --overwrite deletes the earlier run's checkpoints and metrics, unless this run continues one of
    its checkpoints. Its adapter (with its run_config.json and tokenizer) stays until the final save
    replaces it: a run that is interrupted, stops on a NaN or fills the disk leaves the old adapter.
    Leftover .partial folders (a save cut short) go in any case. A README.md already there is kept.
    Returns the branch this run's checkpoints go on (see live_branch).
    """
    doomed = [p for p in out.iterdir() if PARTIAL_NAME.fullmatch(p.name)]
    if cfg.overwrite:
        if not continues_here(cfg, out):
            doomed += list(run_checkpoints(out).values())
            doomed += [out / METRICS_FILE] if (out / METRICS_FILE).exists() else []
    for path in doomed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return new_branch(cfg, out)


# --- writing ---------------------------------------------------------------------------------------


def keep_metrics_until(out: Path, step: int) -> None:
    """Drop the metrics.jsonl lines of steps after `step`, where this run (re)starts: a resume from
    an older checkpoint, or an --auto-batch-size retry, then logs each step once. A line cut short
    by a crash (not JSON) goes too. Written to a temporary file, then renamed."""
    path = out / METRICS_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    replace_text(path, "".join(kept), METRICS_FILE, out)


def replace_text(path: Path, text: str, what: str, out: Path) -> None:
    """write_atomically, for a file of the output folder: `what` and `out` name it in the error line."""
    try:
        write_atomically(path, text)
    except OSError as err:
        raise write_failed(what, out, err) from err


def write_atomically(path: Path, text: str, temporary: Path | None = None) -> None:
    """Replace the file `path` by `text`: written to a temporary file beside it (`.NAME.partial`
    unless given), then renamed, so that a crash or a full disk leaves the old file whole. An
    OSError is raised as it came, the temporary file removed."""
    temporary = temporary or path.with_name(f".{path.name}.partial")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def append_metrics(out: Path, record: dict) -> None:
    """One line of metrics.jsonl (main process)."""
    try:
        with open(out / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:
        raise write_failed(METRICS_FILE, out, err) from err


def save_final(cfg: Config, model, tokenizer, out: Path) -> None:
    """The finished run: adapter (safetensors), tokenizer and run_config.json (main process).

    Written as checkpoints are: into a temporary folder, then renamed into place, the adapter file
    last. Renaming needs no space, so a full disk stops the save before anything in `out` changes,
    and a crash leaves the whole adapter or none (never an adapter without its run_config.json).
    peft's model card (README.md) is only added where there is none.
    """
    partial = out / ".final.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / RUN_CONFIG).write_text(cfg.to_json())
    except WRITE_ERRORS as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_failed("the final adapter", out, err) from err
    if (out / "README.md").exists():
        (partial / "README.md").unlink(missing_ok=True)
    # An earlier run's adapter (--overwrite) goes only now, the new one whole beside it, and first: a
    # crash during the renames then leaves no adapter beside another run's run_config.json.
    (out / ADAPTER_FILE).unlink(missing_ok=True)
    for name in sorted((p.name for p in partial.iterdir()), key=lambda name: name == ADAPTER_FILE):
        os.replace(partial / name, out / name)
    partial.rmdir()


def write_failed(what: str, out: Path, err: BaseException | None) -> YodaError:
    """The one-line error for a write that failed (a full disk, usually): what, where, why, how much
    space is left, and which checkpoint is intact to continue from. `err` is None on a process that
    wrote its part while another one failed."""
    if err is None:
        reason = "another process failed to write its part"
    elif isinstance(err, OSError) and err.strerror:
        reason = err.strerror
    else:
        reason = str(err).strip().splitlines()[0]
    with contextlib.suppress(OSError):
        reason += f"; {size(shutil.disk_usage(out).free)} free there"
    newest = latest_checkpoint(out)
    if newest:
        intact = f"the checkpoints saved before are intact; free some space, then continue with --resume {newest}"
    else:
        intact = "no checkpoint was saved before it; free some space and start over with --overwrite"
    return YodaError(f"could not write {what} in {out} ({reason}); {intact}")


def size(n_bytes: float) -> str:
    """A byte count for people: 1536 -> '1.5 KiB', 3 * 2**30 -> '3.0 GiB'."""
    if n_bytes < 1024:
        return f"{n_bytes:.0f} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n_bytes /= 1024
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.1f} {unit}"
