"""Checkpoints: save a resumable state during training, and continue from one.

A checkpoint is a folder `OUTPUT_DIR/checkpoint-N` holding what a run needs to continue exactly as
if it had never stopped: the LoRA adapter (safetensors; the 4-bit base never changes and is reloaded
from its source), the optimizer state and every process's random states (Accelerate's save_state),
the step (which fixes both the data position and the learning rate) and the resolved config.
And at the end of a run, with --push-to-hub, the saved adapter uploaded to the Hub.
"""

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import huggingface_hub
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import extract_model_from_parallel
from accelerate.utils.other import load as accelerate_load
from peft import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file

from yoda_raw.config import Config, read_json
from yoda_raw.errors import YodaError
from yoda_raw.errors import reason as error_reason
from yoda_raw.identity import add_file, check_base_model
from yoda_raw.output import ADAPTER_FILE, TRAINER_STATE, WRITE_ERRORS, Branch, live_branch, write_failed


def save_checkpoint(cfg: Config, accelerator: Accelerator, out: Path, step: int, branch: Branch | None = None) -> None:
    """A resumable checkpoint: adapter (safetensors), optimizer and RNG states (Accelerate's
    save_state), the step (which fixes the data position and the learning rate) and the config.
    Written into a temporary folder, then renamed: a crash or a full disk mid-save leaves the
    checkpoints before it whole, and no half-written one. `branch` (the main process's, from
    output.start) places it on the run's branch of checkpoints (see output.live_branch)."""
    final = out / f"checkpoint-{step}"
    partial = out / f".checkpoint-{step}.partial"

    def stop_if_any_failed(failure: Exception | None) -> None:
        # One all-reduce: every process learns whether any of them failed, so that all stop together
        # (one alone would leave the others waiting for it in their next collective).
        failed = accelerator.reduce(torch.tensor(int(failure is not None), device=accelerator.device), "sum")
        if failed.item():
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise write_failed(final.name, out, failure) from failure

    failure = None
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            (partial / "run_config.json").write_text(cfg.to_json())
    except WRITE_ERRORS as err:
        failure = err
    # Every process writes its own random states into `partial`: the all-reduce also waits for all
    # of them, so that the hashes below cover every file.
    stop_if_any_failed(failure)
    if accelerator.is_main_process:
        try:
            # num_processes: the data position of a step depends on it (rows are dealt to processes).
            # files: a sha256 of every file, so that a resume can refuse a truncated or damaged one
            # instead of failing deep inside torch, or (RNG states) silently resuming inexactly.
            # Hashing costs a read of the adapter and optimizer state (~0.1 s for Phi-3-mini's LoRA).
            files = {file.name: file_sha256(file) for file in sorted(partial.iterdir()) if file.is_file()}
            state = {"step": step, "num_processes": accelerator.num_processes, "files": files}
            state |= branch.place(step) if branch else {}
            (partial / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        except WRITE_ERRORS as err:
            failure = err
    stop_if_any_failed(failure)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if cfg.save_total_limit:
            # The live branch's only: checkpoints left from before a resume from an older one are not
            # this run's to count, and it replaces those of the same numbers as it gets there.
            for old in live_branch(out)[: -cfg.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    add_file(digest, path)
    return digest.hexdigest()


_MISSING = object()  # a key run_config.json lacks (hand-edited, damaged): never equal to a value

# Options that must be the same to resume: the model, the adapter, the data and how it is cut, and
# the optimizer (another one has another state: AdamW's exp_avg is not 8-bit AdamW's state1).
RESUME_MUST_MATCH = (
    "model",
    "init",
    "quant",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
    "dataset",
    "prompt_field",
    "response_field",
    "system_prompt",
    "eval_fraction",
    "train_on",
    "packing",
    "max_length",
    "shuffle",
    "seed",
    "batch_size",
    "grad_accum",
    "optim",
)


def check_checkpoint(cfg: Config, num_processes: int) -> None:
    """Refuse, in one line and before the model loads, a --resume this run cannot continue exactly:
    not a checkpoint, a missing or damaged file, other settings, another tokenizer or other data
    behind the same path, another number of processes."""
    path = Path(cfg.resume)
    if not (path / TRAINER_STATE).is_file() or not (path / ADAPTER_FILE).is_file():
        raise YodaError(
            f"--resume {path}: not a checkpoint (no trainer_state.json and {ADAPTER_FILE}); "
            "pass an OUTPUT_DIR/checkpoint-N folder"
        )
    fix = "resume from another checkpoint-N, or start again without --resume"
    state = read_json(path / TRAINER_STATE, fix)
    if not isinstance(state.get("step"), int) or state["step"] < 1:
        raise YodaError(f"{path / TRAINER_STATE} is damaged (no step number); {fix}")
    for name, digest in state.get("files", {}).items():  # checkpoints from before hashes were saved: none
        if not (path / name).is_file():
            raise YodaError(f"--resume {path}: {name} is missing; {fix}")
        if file_sha256(path / name) != digest:
            raise YodaError(f"--resume {path}: {name} is damaged (it changed since it was saved); {fix}")

    saved = read_json(path / "run_config.json", fix)
    differ = [
        f"{key} ({repr(saved[key]) if key in saved else 'missing'} there, {getattr(cfg, key)!r} now)"
        for key in RESUME_MUST_MATCH
        if saved.get(key, _MISSING) != getattr(cfg, key)
    ]
    if differ:
        raise YodaError(f"--resume {path}: the checkpoint was made with other settings: {'; '.join(differ)}")
    # The same --tokenizer and --dataset can hold other contents; None: a checkpoint from before they were recorded.
    if saved.get("tokenizer_sha256") not in (None, cfg.tokenizer_sha256):
        raise YodaError(
            f"--resume {path}: the tokenizer {cfg.tokenizer_source} is not the one the checkpoint was trained "
            f"with (sha256 {saved['tokenizer_sha256'][:12]}... there, {cfg.tokenizer_sha256[:12]}... now); "
            "pass the run's --tokenizer"
        )
    if saved.get("data_sha256") not in (None, cfg.data_sha256):
        raise YodaError(
            f"--resume {path}: {cfg.dataset} has changed since the checkpoint was trained on it (content sha256 "
            f"{saved['data_sha256'][:12]}... there, {cfg.data_sha256[:12]}... now); restore that data, "
            "or start a new run without --resume"
        )

    check_base_model(
        saved.get("base_model_id"), cfg.base_model_id, cfg.model, f"--resume {path}",
        "restore the weights it was trained on, or start a new run without --resume",
    )  # fmt: skip

    saved_processes = state.get("num_processes", 1)  # checkpoints from before it was recorded: 1 process
    if saved_processes != num_processes:
        raise YodaError(
            f"--resume {path}: the checkpoint was made on {saved_processes} process(es), this run has "
            f"{num_processes}; resume with `accelerate launch --num_processes {saved_processes}`"
        )
    # Accelerate skips an unreadable random-state file silently: the resume would not be exact. So each
    # is read here, before training (checkpoints from before the hashes have nothing else to check them).
    for rank in range(num_processes):
        name = f"random_states_{rank}.pkl"
        if not (path / name).is_file():
            raise YodaError(f"--resume {path}: {name} is missing; {fix}")
        if name in state.get("files", {}):
            continue  # its sha256 was checked above: the file is the one that was saved
        try:
            states = accelerate_load(path / name)  # as load_state reads it: torch's weights_only unpickler
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, AttributeError):
            states = None
        if not isinstance(states, dict) or "torch_manual_seed" not in states:
            raise YodaError(
                f"--resume {path}: {name} cannot be read (damaged?), so the resume would not be exact; {fix}"
            )


def resume_from(cfg: Config, accelerator: Accelerator, total_steps: int) -> int:
    """Load the checkpoint (checked by check_checkpoint) into the prepared model and optimizer;
    returns the step to continue from."""
    path = Path(cfg.resume)
    step = read_json(path / TRAINER_STATE, "resume from another checkpoint-N")["step"]
    if step > total_steps:
        ends = f"--max-steps {cfg.max_steps}" if cfg.max_steps > 0 else f"--epochs {cfg.epochs}"
        raise YodaError(
            f"--resume {path}: the checkpoint is at step {step} and this run ends at step {total_steps} "
            f"({ends}), so nothing is left to train; raise {ends.split()[0]} to train on"
        )
    if step == total_steps:
        # The last checkpoint of a run whose final save failed (a full disk): nothing to train, but the
        # final adapter is still to be written. Said, so that it is not mistaken for a run that trained.
        accelerator.print(f"--resume {path}: the checkpoint is at the run's last step; writing the final adapter")
    try:
        accelerator.load_state(str(path))
    except (OSError, EOFError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError, SafetensorError) as err:
        # What the hashes cannot catch: a checkpoint from before they were saved, or one from another version.
        reason = error_reason(err)
        raise YodaError(
            f"--resume {path}: cannot load it ({reason}); resume from another checkpoint-N, or start again"
        ) from None
    return step


def save_adapter_only(models, weights, output_dir):
    """Accelerate save_state hook: write the LoRA adapter (safetensors) instead of the whole model,
    whose 4-bit base never changes and is reloaded from its source on resume."""
    for model in models:
        # Unwrap DDP (it has no save_pretrained); every process runs this hook, only the main one writes.
        extract_model_from_parallel(model).save_pretrained(output_dir, is_main_process=PartialState().is_main_process)
    weights.clear()


def load_adapter_only(models, input_dir):
    for model in list(models):
        set_peft_model_state_dict(extract_model_from_parallel(model), load_file(os.path.join(input_dir, ADAPTER_FILE)))
    models.clear()


# --- the Hub: an adapter pushed after it is saved -------------------------------------------------


def check_hub_token(cfg: Config) -> None:
    """Fail before training, not after it, when --push-to-hub has no token to push with. The token
    comes from HF_TOKEN or `huggingface-cli login`; it is never printed, logged or saved."""
    if not cfg.push_to_hub:
        return
    if not huggingface_hub.get_token():
        raise YodaError(f"--push-to-hub {cfg.push_to_hub}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    try:
        huggingface_hub.whoami()  # the token is good and the Hub can be reached: a network call, once
    except Exception as err:  # noqa: BLE001 - offline, no network, a bad token: all mean "cannot push"
        raise YodaError(
            f"--push-to-hub {cfg.push_to_hub}: cannot reach the Hugging Face Hub with this token "
            f"({error_reason(err)}); check the network and token, or train without --push-to-hub and upload "
            "later with `hf upload`"
        ) from None


def push_to_hub(cfg: Config, out: Path) -> None:
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(cfg.push_to_hub, exist_ok=True, private=True)
        api.upload_folder(repo_id=cfg.push_to_hub, folder_path=out, ignore_patterns=["checkpoint-*", ".*"])
    except Exception as err:  # noqa: BLE001 - the network went away, the Hub refused: the adapter is saved either way
        raise YodaError(
            f"--push-to-hub {cfg.push_to_hub}: the upload failed ({error_reason(err)}); the adapter is saved in {out}: "
            f"upload it later with `hf upload {cfg.push_to_hub} {out} --private --exclude 'checkpoint-*'`"
        ) from None
    print(f"pushed {out} to https://huggingface.co/{cfg.push_to_hub}")
