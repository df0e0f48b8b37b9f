"""The training loop, managed by Accelerate, written out step by step.

`main(cfg)` is everything `run.py` does: set up, load the data and the model, `fit`, save.
Vocabulary (litgpt's): a *micro-batch* is one forward/backward of `batch_size` rows; a *step* is
one optimizer update over `grad_accum` micro-batches. `fit` is the loop; it reads top to bottom.

What `with accelerator.accumulate(model)` would hide is written out in `fit` instead:
1. the loss of a step is normalised once for the whole step (see `loss.token_loss_sum`), not divided
   by the number of micro-batches;
2. gradients are only synchronised between processes on the step's last micro-batch
   (`accelerator.no_sync` on the others: each all-reduce costs a full pass over the gradients);
3. the optimizer steps once per step, after all micro-batches.
"""

import contextlib
import dataclasses
import itertools
import math
import signal
import sys
import time
from pathlib import Path

import huggingface_hub
import torch
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import (
    find_executable_batch_size,
    is_tensorboard_available,
    parse_flag_from_env,
    set_seed,
)
from tqdm.auto import tqdm

from yoda_raw import meter, output
from yoda_raw.chat import IGNORE, load_tokenizer, tokenizer_sha256
from yoda_raw.checkpoint import check_checkpoint, load_adapter_only, resume_from, save_adapter_only, save_checkpoint
from yoda_raw.config import TUTORIAL_MODEL, Config
from yoda_raw.data import content_sha256, load_conversations, split_conversations
from yoda_raw.dequant import resolve as resolve_reuse_dequant
from yoda_raw.dequant import resolve_fp8, reuse_dequantized_weights
from yoda_raw.dropout import resolve as resolve_seeded_dropout
from yoda_raw.dropout import use_seeded_dropout
from yoda_raw.errors import Interrupted, YodaError
from yoda_raw.evaluate import end_of_run_report, format_report
from yoda_raw.graphs import CapturedStep
from yoda_raw.graphs import resolve as resolve_cuda_graph
from yoda_raw.loss import supervised_count, token_loss_sum
from yoda_raw.model import (
    add_lora,
    check_uncheckpointed_layers,
    choose_lora_targets,
    compile_layers,
    load_base_model,
    load_model_config,
    parameter_counts,
    parameter_line,
    resolve_compile,
    resolve_quant,
    skeleton,
)
from yoda_raw.optim import build_optimizer, learning_rate
from yoda_raw.packing import Collator, build_rows
from yoda_raw.precision import Precision, choose_precision


@dataclasses.dataclass
class FitResult:
    """What `fit` did."""

    steps: int  # optimizer steps done (all of total_steps: a run stopped by a signal raises Interrupted instead)
    total_steps: int
    steps_per_epoch: int
    batch_size: int  # rows per micro-batch: what --auto-batch-size settled on
    skipped_steps: int  # fp16: updates the loss scaler skipped because gradients overflowed
    log: list[dict]  # one record per logging step, as written to metrics.jsonl
    allocated_before_loop_bytes: int | None  # torch's allocated memory with the model alone (CUDA; None on CPU)
    optimizer: torch.optim.Optimizer  # live, with its state: what a memory breakdown counts


@dataclasses.dataclass
class Live:
    """The objects a run leaves in memory, for code that goes on using them (tests, benchmarks)."""

    model: torch.nn.Module  # the trained LoRA model, unwrapped from DDP
    tokenizer: object
    held_out: list[dict]  # the conversations the run did not train on


@dataclasses.dataclass
class RunResult:
    """What `main` returns: the run's figures, and apart from them the live objects."""

    fit: FitResult
    config: Config  # the configuration as run: --cuda-graph auto resolved
    report: dict | None  # the end-of-run held-out report (None without --samples or held-out data)
    trainable_params: int
    total_params: int
    output_dir: str
    precision: str  # what --precision resolved to on this device
    is_main_process: bool
    seconds: dict  # wall time of each stage: starting, loading, training, saving (and evaluating, with a report)
    live: Live


def main(cfg: Config) -> RunResult:
    """Data, model, fit, save: what `accelerate launch run.py` runs."""
    started = time.perf_counter()
    accelerator, precision = make_accelerator(cfg)
    check_device(cfg, accelerator)
    cfg = settle_for_machine(cfg, accelerator, precision)
    check_hub_token(cfg)
    # The output folder is checked and locked before anything is loaded (yoda_raw/output.py).
    with output.owned(cfg, accelerator) as out:
        return train_and_save(cfg, accelerator, precision, out, started)


def settle_for_machine(cfg: Config, accelerator: Accelerator, precision: Precision) -> Config:
    """--cuda-graph, --compile-layers and --seeded-dropout auto -> on or off on this machine, so that
    the printed and saved config say what this run does (yoda_raw.trace settles them the same way)."""
    graph = resolve_cuda_graph(cfg.cuda_graph, accelerator.device, accelerator.num_processes, precision.name)
    compiled = resolve_compile(cfg.compile_layers, graph, accelerator.device)
    seeded = resolve_seeded_dropout(cfg.seeded_dropout, graph == "on" and compiled == "on", cfg.lora_dropout)
    return dataclasses.replace(cfg, cuda_graph=graph, compile_layers=compiled, seeded_dropout=seeded)


def settle_for_model(cfg: Config, model_config, device: torch.device, precision: Precision) -> Config:
    """--quant, --fp8-matmuls and --reuse-dequant auto and the default LoRA targets, from the machine
    and the model's config, before any weights load: a wrong --lora-targets stops the run at once,
    and the config printed and saved is the one that runs."""
    skeleton_model = skeleton(model_config, cfg.trust_remote_code)
    quant = resolve_quant(cfg.quant, device)
    fast_path = (  # where FP8 was measured: compiled layers in the CUDA graph, 4-bit weights computed in bf16
        cfg.cuda_graph == "on"
        and cfg.compile_layers == "on"
        and precision.name == "bf16"
        and quant == "nf4"
        and cfg.quant_compute_dtype == "auto"
        and cfg.gradient_checkpointing
        and cfg.reuse_dequant != "off"
    )
    fp8 = resolve_fp8(cfg.fp8_matmuls, fast_path, device, skeleton_model)
    cfg = dataclasses.replace(cfg, quant=quant, fp8_matmuls=fp8)
    check_uncheckpointed_layers(cfg, skeleton_model)  # against the --reuse-dequant given
    return dataclasses.replace(
        cfg,
        reuse_dequant=resolve_reuse_dequant(
            cfg.reuse_dequant, cfg.cuda_graph, quant, cfg.gradient_checkpointing, cfg.fp8_matmuls
        ),
        lora_targets=choose_lora_targets(cfg.lora_targets, skeleton_model, cfg.model),
    )


def train_and_save(cfg: Config, accelerator: Accelerator, precision: Precision, out: Path, started: float) -> RunResult:
    """The run, in a folder it owns: data, model, fit, save. `started`: when main began (the
    accelerator, CUDA's start and the checks before this are the time line's "starting")."""
    loading = time.perf_counter()
    tokenizer = load_tokenizer(cfg.tokenizer_source, trust_remote_code=cfg.trust_remote_code)
    model_config = load_model_config(cfg, len(tokenizer))
    cfg = settle_for_model(cfg, model_config, accelerator.device, precision)
    set_seed(cfg.seed)

    # Data: conversations (with the system prompt) -> held-out split -> token rows with labels.
    conversations = load_conversations(
        cfg.dataset, cfg.prompt_field, cfg.response_field, "train", cfg.skip_invalid, cfg.system_prompt
    )
    # Recorded in run_config.json: a resume (and evaluate's held-out split) checks that both are the same.
    cfg.tokenizer_sha256, cfg.data_sha256 = tokenizer_sha256(tokenizer), content_sha256(conversations)
    if cfg.resume:
        check_checkpoint(cfg, accelerator.num_processes)  # before the slow model load
    accelerator.print(f"config:\n{cfg.to_json()}\nprecision: {precision.name}, device: {accelerator.device}")
    train_conversations, held_out = split_conversations(conversations, cfg.eval_fraction, cfg.seed)
    rows = build_rows(tokenizer, train_conversations, cfg.max_length, cfg.train_on, cfg.packing, cfg.shuffle, cfg.seed)
    collator = Collator(tokenizer.pad_token_id)
    accelerator.print(
        f"data: {len(train_conversations)} conversations for training, {len(held_out)} held out, {len(rows)} rows"
    )

    # Model: 4-bit base + LoRA.
    context = model_config.max_position_embeddings
    if cfg.max_length > context:
        raise YodaError(f"--max-length {cfg.max_length} is longer than the model's context of {context} tokens")
    model = load_base_model(cfg, precision, accelerator.device, vocab_size=len(tokenizer))
    model = add_lora(model, cfg)
    if cfg.seeded_dropout == "on":
        use_seeded_dropout(model)  # before compiling, as the two below
    if cfg.reuse_dequant == "on" or cfg.fp8_matmuls == "on":
        reuse_dequantized_weights(model, fp8=cfg.fp8_matmuls == "on")  # before compiling: they trace it
    if cfg.compile_layers == "on":
        compile_layers(model)  # compiled lazily, at the first step
    trainable, total = parameter_counts(model)
    accelerator.print(parameter_line(model))

    # Only now, with the data and model known good, clear what --overwrite replaces.
    if accelerator.is_main_process:
        output.start(cfg, out)
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
            return fit(cfg, accelerator, model, rows, collator, batch_size, out)
        except torch.OutOfMemoryError as err:
            if retry_on_oom and batch_size > 1:
                raise  # find_executable_batch_size tries again with 0.9x the rows
            raise OutOfMemory(batch_size, cfg.auto_batch_size, accelerator.num_processes) from err

    loaded = time.perf_counter()
    if retry_on_oom:
        # Accelerate's decorator calls fit_batch_size(cfg.batch_size), then 0.9x that after each
        # out-of-memory error; it supplies the batch size itself, so it is called with no arguments.
        fit_shrinking_on_oom = find_executable_batch_size(fit_batch_size, starting_batch_size=cfg.batch_size)
        fitted = fit_shrinking_on_oom()
    else:
        fitted = fit_batch_size(cfg.batch_size)
    trained = time.perf_counter()
    seconds = {"starting": loading - started, "loading": loaded - loading, "training": trained - loaded}  # wall time

    # Save: adapter (safetensors), tokenizer, resolved configuration; whole or not at all.
    accelerator.wait_for_everyone()
    report = None
    if accelerator.is_main_process:
        output.save_final(cfg, accelerator.unwrap_model(model), tokenizer, out)
        saved = time.perf_counter()
        seconds["saving"] = saved - trained
        if cfg.samples and held_out:
            # A short evaluation and a few translations of sentences it did not train on. Eager, compiled
            # layers or not: without gradients, and at every length generation passes through, they
            # would compile again and again (8 times, then torch gives up with a warning).
            try:
                with torch.compiler.set_stance("force_eager"):
                    report = end_of_run_report(
                        accelerator.unwrap_model(model), tokenizer, held_out, system_prompt=cfg.system_prompt
                    )
            except KeyboardInterrupt:
                raise Interrupted(
                    f"interrupted during the end-of-run evaluation; the adapter is saved in {out}: "
                    f"evaluate it with `python -m yoda_raw.evaluate --adapter {out}`"
                ) from None
            print(format_report(report))
            output.append_metrics(out, {"step": fitted.steps, **report})
            seconds["evaluating"] = time.perf_counter() - saved
        if cfg.push_to_hub:
            push_to_hub(cfg, out)
    accelerator.end_training()
    return RunResult(
        fit=fitted,
        config=cfg,
        report=report,
        trainable_params=trainable,
        total_params=total,
        output_dir=str(out),
        precision=precision.name,
        is_main_process=accelerator.is_main_process,
        seconds=seconds,
        live=Live(accelerator.unwrap_model(model), tokenizer, held_out),
    )


def make_accelerator(cfg: Config) -> tuple[Accelerator, Precision]:
    """The Accelerator, with the mixed precision decided in precision.py for this process's device."""
    # cpu= as Accelerator itself reads it: a bare PartialState() ignores ACCELERATE_USE_CPU, so on
    # `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` (gloo) every process became a lone "main".
    precision = choose_precision(cfg.precision, PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device)
    if cfg.report_to == "tensorboard" and not is_tensorboard_available():
        raise YodaError("--report-to tensorboard needs the tensorboard package: pip install tensorboard")
    accelerator = Accelerator(
        mixed_precision=precision.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
        # even_batches=False: on several processes the last, short batch of an epoch is not padded
        # with rows from the start of the epoch (those would be trained twice); fit handles a
        # process left without rows. non_blocking: batches go to the GPU without the host waiting
        # (from pinned memory, see fit).
        dataloader_config=DataLoaderConfiguration(even_batches=False, non_blocking=True),
    )
    accelerator.register_save_state_pre_hook(save_adapter_only)
    accelerator.register_load_state_pre_hook(load_adapter_only)
    return accelerator, precision


def check_device(cfg: Config, accelerator: Accelerator) -> None:
    """3.8B parameters on a CPU would take days: stop at once and point to the smol preset."""
    if accelerator.device.type == "cpu" and cfg.model == TUTORIAL_MODEL:
        raise YodaError(
            f"no CUDA GPU found: {TUTORIAL_MODEL} (3.8B parameters) is no real option on a CPU; "
            "`python run.py --preset smol` teaches the pretrained SmolLM2-135M-Instruct Yoda speak in minutes "
            "on a CPU (without the Hub, first `python -m yoda_raw.fetch smol`), or pass a small --model"
        )


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
            f"--push-to-hub {cfg.push_to_hub}: cannot reach the Hugging Face Hub with this token ({_first_line(err)}); "
            "check the network and token, or train without --push-to-hub and upload later with `hf upload`"
        ) from None


def fit(
    cfg: Config, accelerator: Accelerator, model, rows: list[dict], collator: Collator, batch_size: int, out: Path
) -> FitResult:
    """Train `model` on `rows`. The loop: one iteration = one optimizer step."""
    device = accelerator.device
    loader = make_loader(rows, batch_size, collator, EpochSampler(len(rows), cfg.shuffle, cfg.seed), device)
    allocated_before_loop = meter.allocated_bytes(device)  # the model alone, before any optimizer state
    trainable, total = parameter_counts(model)
    flops_per_token = meter.flops_per_token(total - trainable, trainable)  # for MFU in the log
    # With the CUDA graph the gradients are never freed, so the optimizer can take all LoRA tensors as
    # one flat tensor (optim.FlatAdamW: one update kernel instead of one per tensor, the same update).
    optimizer = build_optimizer(
        model.parameters(), cfg.optim, cfg.lr, cfg.weight_decay, device, flat=cfg.cuda_graph == "on"
    )
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
    # --cuda-graph: the micro-batch's forward and backward replayed from a recording (graphs.py).
    captured = None
    if cfg.cuda_graph == "on":
        # Rows of the graph: a batch, or all the rows when there are fewer (no rows of padding only).
        captured = CapturedStep(model, min(batch_size, len(rows)), cfg.max_length, collator.pad_id, device)
    if accelerator.is_main_process:
        # From here on metrics.jsonl holds each step once: lines after start_step are from the run
        # before a resume from an older checkpoint, or from an --auto-batch-size attempt that failed.
        output.keep_metrics_until(out, start_step)

    meter.reset_peaks(device)  # peaks from here on are the training loop's (the weights stay counted)
    loop_start = time.perf_counter()
    bar = tqdm(
        total=total_steps, initial=start_step, disable=not accelerator.is_main_process, desc="training", unit="step"
    )
    window = new_window(device)
    logged, skipped = [], 0
    first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # the NaN guard's flag: 0 while all is well
    model.train()
    step, stopping = start_step, False
    # However the loop ends (done, a NaN, out of memory, a full disk, a second Ctrl-C), the bar is
    # closed and the signal handlers are given back: left installed, they would swallow the next
    # Ctrl-C of this process.
    with StopOnSignal() as stop, bar:
        while step < total_steps and not stopping:
            epoch = step // steps_per_epoch
            loader.set_epoch(epoch)
            # On resume, skip the micro-batches this epoch already trained on: drawn (collated and copied,
            # a few small token tensors each) and dropped, once per resume. Accelerate's skip_first_batches
            # would copy the batches after them without non_blocking.
            batches = itertools.islice(loader, (step % steps_per_epoch) * cfg.grad_accum, None)
            for _ in range(step % steps_per_epoch, min(steps_per_epoch, total_steps - epoch * steps_per_epoch)):
                # Learning rate of this step (a plain function of the step: see optim.learning_rate).
                lr = learning_rate(step, cfg.lr, cfg.warmup_steps, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr

                # The step's micro-batches, and its loss denominator: their supervised tokens, summed
                # over all processes (an all-reduce on the device, not a host sync).
                micro_batches = list(itertools.islice(batches, cfg.grad_accum))  # fewer at an epoch's end
                if not micro_batches:
                    # Multi-process, last step of an epoch: this process's share of rows ran out. It still
                    # has to join DDP's gradient all-reduce, so it runs one row with nothing supervised
                    # (loss 0, gradient 0); the other processes' rows are normalised exactly as ever.
                    micro_batches = [unsupervised_batch(collator, rows, device)]
                local_supervised = sum(supervised_count(b) for b in micro_batches)
                n_supervised = accelerator.reduce(local_supervised, "sum").clamp(min=1)  # all masked: loss 0, not 0/0

                # Forward and backward, one micro-batch at a time.
                if captured is None:
                    step_loss = forward_backward(accelerator, model, micro_batches, n_supervised)
                else:
                    step_loss = captured.forward_backward(micro_batches, n_supervised)
                window["tokens"] += sum(b["attention_mask"].sum() for b in micro_batches)
                window["supervised"] += local_supervised

                # Clip and update. The grad norm is non-finite when the loss or any gradient is; the NaN
                # guard stays on the device (reading it here would make the CPU wait for the GPU every step).
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
                if not accelerator.scaler:  # under fp16 the loss scaler skips such steps itself
                    first_bad_step = zero_nonfinite_grads(grad_norm, optimizer, first_bad_step, step + 1)
                optimizer.step()
                skipped += int(accelerator.optimizer_step_was_skipped)
                # A captured graph adds into the same gradient tensors every replay: zero them, keep them.
                optimizer.zero_grad(set_to_none=captured is None)
                window["loss"] += step_loss / n_supervised  # this process's share; summed over processes at logging
                window["steps"] += 1
                step += 1
                bar.update(1)

                # Log: the only host syncs of the loop (.item(), the clock) happen here and at checkpoints.
                # A stop (Ctrl-C, SIGTERM) is read here; with several processes only at these sync points,
                # where they agree on it (see StopOnSignal.agreed).
                log_due = step % cfg.logging_steps == 0 or step == total_steps
                save_due = cfg.save_steps > 0 and step % cfg.save_steps == 0
                if log_due or stop.agreed(accelerator, at_sync_point=save_due):
                    check_finite(first_bad_step, step)  # nothing is logged after a NaN
                    record = log_window(window, step, steps_per_epoch, lr, grad_norm, flops_per_token, accelerator)
                    record |= {"skipped_steps": skipped, "batch_size": batch_size}  # what --auto-batch-size settled on
                    record["elapsed_s"] = round(time.perf_counter() - loop_start, 2)  # the first includes compiling
                    logged.append(record)
                    write_record(record, accelerator, bar, out)
                    if len(logged) == 1 and device.type == "cuda" and accelerator.is_main_process:
                        # Once a run: where the memory went, counted tensor by tensor (meter.py).
                        unwrapped = accelerator.unwrap_model(model)
                        breakdown = meter.memory_breakdown(unwrapped, optimizer, allocated_before_loop, record, device)
                        tqdm.write(meter.format_breakdown(breakdown))
                    window = new_window(device)
                # Checkpoint on schedule, or when asked to stop (Ctrl-C, SIGTERM; also during the logging above,
                # which is why this is read after it). The stop is read once, here: a signal that comes after
                # it stops the next step (on several processes: the next log line or checkpoint), which saves.
                stopping = stop.agreed(accelerator, at_sync_point=log_due or save_due)
                if save_due or stopping:
                    check_finite(first_bad_step, step)  # nothing is saved after a NaN
                    save_checkpoint(cfg, accelerator, out, step)
                if stopping:
                    break
    if stopping and step < total_steps:
        # Not a finished run: no final adapter, no evaluation, and a non-zero exit status.
        checkpoint = out / f"checkpoint-{step}"
        raise Interrupted(
            f"{signal.Signals(stop.signum).name}: stopped after step {step} and saved {checkpoint}; "
            f"continue with --resume {checkpoint} (and the same options)",
            stop.signum,
        )
    return FitResult(
        steps=step,
        total_steps=total_steps,
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        skipped_steps=skipped,
        log=logged,
        allocated_before_loop_bytes=allocated_before_loop,
        optimizer=optimizer,
    )


def make_loader(rows: list[dict], batch_size: int, collator: Collator, sampler, device: torch.device):
    """The loop's DataLoader, for train.fit and yoda_raw.trace."""
    # generator=: each epoch's iterator draws a seed from it instead of from the global RNG that dropout uses,
    # so a run resumed mid-epoch draws the same dropout masks as an uninterrupted one.
    # pin_memory (with non_blocking, make_accelerator): a copy to the GPU from ordinary memory makes
    # the host wait until the GPU has finished all the work queued before it, three waits a step
    # (one per tensor of the batch), and the GPU then idles while the host prepares the next step.
    return torch.utils.data.DataLoader(
        rows,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collator,
        generator=torch.Generator(),
        pin_memory=device.type == "cuda",
    )


class EpochSampler(torch.utils.data.Sampler):
    """Row order for one epoch: a permutation seeded by (seed + epoch), or the dataset order.

    Seeding by epoch makes the order of any epoch reproducible on its own, which is what lets a
    resumed run see exactly the rows an uninterrupted one would. Accelerate calls `set_epoch`.
    """

    def __init__(self, n_rows: int, shuffle: bool, seed: int):
        self.n_rows, self.shuffle, self.seed, self.epoch = n_rows, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_rows

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n_rows))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n_rows, generator=generator).tolist())


class StopOnSignal:
    """Turn Ctrl-C (SIGINT) and SIGTERM into a request to stop after the current step, so that the
    run can save a resumable checkpoint instead of dying mid-step. A second Ctrl-C stops at once.
    The handlers are in place inside a `with` block only, and the ones before are given back after it."""

    def __init__(self):
        self.requested, self.signum = False, None

    def __enter__(self):
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint", file=sys.stderr)

    def agreed(self, accelerator: Accelerator, at_sync_point: bool) -> bool:
        """Whether to stop after this step, the same answer on every process. A signal can reach one
        process only (a scheduler, a `kill` by hand); if that one alone stopped to save, the others
        would wait for it forever in their next all-reduce. So with several processes they agree
        through an all-reduce, at the loop's sync points only (a log line, a checkpoint): a stop
        comes at the next one of those, and the steps between stay free of host syncs. They agree on
        the signal too, the largest number any of them got (SIGTERM, 15, over SIGINT, 2), so that
        every process exits with the same status."""
        if accelerator.num_processes == 1:
            return self.requested
        if not at_sync_point:
            return False
        signum = torch.tensor(self.signum or 0, device=accelerator.device)
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        if signum.item():
            self.signum = int(signum.item())
        return self.signum is not None


def new_window(device: torch.device) -> dict:
    """Running sums of one logging window, kept on the device so that adding to them never syncs."""
    return {
        "loss": torch.zeros((), device=device),
        "tokens": 0,
        "supervised": 0,
        "steps": 0,
        "start": time.perf_counter(),
    }


def unsupervised_batch(collator: Collator, rows: list[dict], device: torch.device) -> dict:
    """One row with every label masked: contributes 0 to the loss and to the gradients."""
    batch = {key: value.to(device) for key, value in collator(rows[:1]).items()}
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    return batch


def forward_backward(accelerator: Accelerator, model, micro_batches: list[dict], n_supervised) -> torch.Tensor:
    """Accumulate the gradients of one step; returns the sum of its token losses on this process.

    Each micro-batch's loss sum is divided by the supervised tokens of the whole step (all its
    micro-batches, all processes), so the accumulated gradient is that of sum / n_supervised. DDP
    averages gradients over processes: multiplying by their number undoes that average. Gradients
    are all-reduced between processes only on the last micro-batch (no_sync on the others).
    """
    step_loss = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        is_accumulating = i < len(micro_batches) - 1
        # no_sync: skip DDP's all-reduce, one pass over every LoRA gradient between the processes,
        # until the step's last micro-batch (a no-op on one process).
        with accelerator.no_sync(model) if is_accumulating else contextlib.nullcontext():
            loss_sum = token_loss_sum(model, batch)  # (,) summed over supervised tokens
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


class OutOfMemory(YodaError):
    """Out of GPU memory in the loop, with nothing left to retry: what ran out, and what lowers it."""

    def __init__(self, batch_size: int, auto_batch_size: bool, num_processes: int):
        if num_processes > 1:
            why = f"with {num_processes} processes --auto-batch-size cannot retry (the others are mid-step)"
        elif auto_batch_size:
            why = "--auto-batch-size found no smaller batch to retry with"
        else:
            why = "pass --auto-batch-size to retry with 0.9x the rows each time"
        super().__init__(
            f"out of GPU memory at --batch-size {batch_size}; {why}; lower --batch-size (with --grad-accum "
            "to keep the step size), or use --gradient-checkpointing, a shorter --max-length, "
            "or --optim paged_adamw_8bit"
        )


class NonFiniteLoss(YodaError):
    def __init__(self, bad_step: int, stopped_at: int | None = None):
        stopped_at = bad_step if stopped_at is None else stopped_at
        super().__init__(
            f"step {bad_step}: the loss or a gradient is NaN or infinite; its gradients were zeroed, and the run "
            f"stopped at step {stopped_at} without logging or saving anything after step {bad_step - 1} "
            "(checkpoints already saved are intact). Try a lower --lr, or --precision bf16/fp32 instead of fp16"
        )


def log_window(
    window: dict,
    step: int,
    steps_per_epoch: int,
    lr: float,
    grad_norm,
    flops_per_token: float,
    accelerator: Accelerator,
) -> dict:
    """Average one logging window into a record. Sync point: .item() waits for the device."""
    tokens = accelerator.reduce(torch.as_tensor(window["tokens"], device=accelerator.device), "sum").item()
    supervised = accelerator.reduce(torch.as_tensor(window["supervised"], device=accelerator.device), "sum").item()
    loss = accelerator.reduce(window["loss"], "sum").item() / window["steps"]
    seconds = time.perf_counter() - window["start"]  # read after .item(), so the device work is done
    record = {
        "step": step,
        "epoch": round(step / steps_per_epoch, 3),
        "loss": round(loss, 6),
        "lr": lr,
        "grad_norm": round(float(grad_norm), 6),
        "tokens": int(tokens),
        "supervised_tokens": int(supervised),
        "tokens_per_s": round(tokens / seconds, 1),
        "supervised_tokens_per_s": round(supervised / seconds, 1),
        "step_s": round(seconds / window["steps"], 4),
    }
    mfu = meter.mfu(tokens / seconds, flops_per_token, accelerator.device, accelerator.num_processes)
    return record | mfu | meter.memory_gib(accelerator.device)


def write_record(record: dict, accelerator: Accelerator, bar: tqdm, out: Path) -> None:
    """Show a logged record on the progress bar, append it to metrics.jsonl, pass it to the trackers."""
    if accelerator.is_main_process:
        shown = {key: record[key] for key in ("loss", "lr", "tokens_per_s", "mfu") if key in record}
        if "peak_allocated_gib" in record:
            shown["peak_gib"] = record["peak_allocated_gib"]
        bar.set_postfix(shown)
        output.append_metrics(out, record)
    accelerator.log(record, step=record["step"])


def push_to_hub(cfg: Config, out: Path) -> None:
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(cfg.push_to_hub, exist_ok=True, private=True)
        api.upload_folder(repo_id=cfg.push_to_hub, folder_path=out, ignore_patterns=["checkpoint-*", ".*"])
    except Exception as err:  # noqa: BLE001 - the network went away, the Hub refused: the adapter is saved either way
        raise YodaError(
            f"--push-to-hub {cfg.push_to_hub}: the upload failed ({_first_line(err)}); the adapter is saved in {out}: "
            f"upload it later with `hf upload {cfg.push_to_hub} {out} --private --exclude 'checkpoint-*'`"
        ) from None
    print(f"pushed {out} to https://huggingface.co/{cfg.push_to_hub}")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
