"""Checkpoints: save a resumable state during training, and continue from one.

A checkpoint is a folder `OUTPUT_DIR/checkpoint-N` holding what a run needs to continue exactly as
if it had never stopped: the LoRA adapter (safetensors; the 4-bit base never changes and is reloaded
from its source), the optimizer state and every process's random states (Accelerate's save_state),
the step (which fixes both the data position and the learning rate) and the resolved config.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import extract_model_from_parallel
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from yoda_raw.config import Config
from yoda_raw.errors import YodaError
from yoda_raw.output import ADAPTER_FILE, WRITE_ERRORS, run_checkpoints, write_failed


def save_checkpoint(cfg: Config, accelerator: Accelerator, out: Path, step: int) -> None:
    """A resumable checkpoint: adapter (safetensors), optimizer and RNG states (Accelerate's
    save_state), the step (which fixes the data position and the learning rate) and the config.
    Written into a temporary folder, then renamed: a crash or a full disk mid-save leaves the
    checkpoints before it whole, and no half-written one."""
    final = out / f"checkpoint-{step}"
    partial = out / f".checkpoint-{step}.partial"
    failure = None
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            # num_processes: the data position of a step depends on it (rows are dealt to processes).
            state = {"step": step, "num_processes": accelerator.num_processes}
            (partial / "trainer_state.json").write_text(json.dumps(state))
            (partial / "run_config.json").write_text(cfg.to_json())
    except WRITE_ERRORS as err:
        failure = err
    # Every process writes its own random states into `partial`: wait for all before renaming it, and
    # learn whether any of them failed (one all-reduce), so that all stop together, not one alone.
    failed = accelerator.reduce(torch.tensor(int(failure is not None), device=accelerator.device), "sum")
    if failed.item():
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise write_failed(final.name, out, failure) from failure
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if cfg.save_total_limit:
            # The newest up to this step: checkpoints numbered higher are left from before a resume
            # from an older one, and this run replaces them as it gets there.
            own = [path for n, path in sorted(run_checkpoints(out).items()) if n <= step]
            for old in own[: -cfg.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


# Options that must be the same to resume: the model, the adapter, the data and how it is cut.
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
)


def resume_from(cfg: Config, accelerator: Accelerator) -> int:
    """Load a checkpoint into the prepared model and optimizer; returns the step to continue from."""
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file() or not (path / ADAPTER_FILE).is_file():
        raise YodaError(
            f"--resume {path}: not a checkpoint (no trainer_state.json and {ADAPTER_FILE}); "
            "pass an OUTPUT_DIR/checkpoint-N folder"
        )
    saved = json.loads((path / "run_config.json").read_text())
    differ = [
        f"{key} ({saved.get(key)!r} there, {getattr(cfg, key)!r} now)"
        for key in RESUME_MUST_MATCH
        if saved.get(key) != getattr(cfg, key)
    ]
    if differ:
        raise YodaError(f"--resume {path}: the checkpoint was made with other settings: {'; '.join(differ)}")
    state = json.loads((path / "trainer_state.json").read_text())
    saved_processes = state.get("num_processes", 1)  # checkpoints from before it was recorded: 1 process
    if saved_processes != accelerator.num_processes:
        raise YodaError(
            f"--resume {path}: the checkpoint was made on {saved_processes} process(es), this run has "
            f"{accelerator.num_processes}; resume with "
            f"`accelerate launch --num_processes {saved_processes}`"
        )
    accelerator.load_state(str(path))
    return state["step"]


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
