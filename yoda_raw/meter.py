"""Measuring the loop: tokens/s, model FLOPs utilisation and memory. Shared by train.py and benchmarks/.

Vocabulary: a *token* is a non-pad input position; a *supervised token* is one whose next-token
label is not -100 (what the loss is averaged over). Throughput is per second of step time.
"""

import os
import threading
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from yoda_raw import output
from yoda_raw.hooks import Observer

GIB = 1024**3

# Dense bf16 tensor-core peak, FLOP/s, from NVIDIA's data sheets (without sparsity). MFU is only
# printed for GPUs listed here; pass a peak to the benchmark for others.
PEAK_BF16_FLOPS = {
    "H200": 989e12,  # H200 SXM data sheet: 1,979 TFLOPS with sparsity
    "H100": 989e12,  # H100 SXM data sheet
    "A100": 312e12,  # A100 data sheet
    "L4": 121e12,  # L4 data sheet
    "RTX 4090": 165e12,  # Ada Lovelace whitepaper, fp32 accumulate
    "RTX 3090": 71e12,  # Ampere GA102 whitepaper, fp32 accumulate
}


def flops_per_token(frozen_params: int, trainable_params: int) -> float:
    """Training FLOPs per token of a LoRA model, as litgpt counts them.

    A matmul with N weights costs 2N FLOPs per token forward. Backward costs 2N for the input
    gradient and, for trainable weights only, 2N more for the weight gradient: 6N for trainable,
    4N for frozen. Recompute under gradient checkpointing and attention scores are not counted
    (MFU measures useful work). Phi-3-mini: 4 * 3.82e9 + 6 * 1.26e7 = 1.53e10 FLOPs per token.
    """
    return 4 * frozen_params + 6 * trainable_params


def mfu(tokens_per_s: float, flops_per_token: float, device: torch.device, n_devices: int = 1) -> dict:
    """Model FLOPs utilisation, {"mfu": fraction}, where the GPU's peak is known; {} elsewhere.
    `tokens_per_s` are those of all `n_devices` together, so the peak is theirs together.

    >>> mfu(1000.0, 1.53e10, torch.device("cpu"))
    {}
    """
    peak = peak_flops(device)
    if peak is None:
        return {}
    return {"mfu": float(f"{flops_per_token * tokens_per_s / (peak * n_devices):.4g}")}  # 4 significant digits


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_gib(device: torch.device) -> dict:
    """Peak memory since start (or since `reset_peaks`), in GiB. Empty on CPU.

    peak_allocated_gib: the most torch's tensors held at once;
    peak_reserved_gib: what torch's caching allocator held from the driver (>= allocated);
    device_used_gib: what NVML says the whole device uses now, which also counts the CUDA context,
    unified (paged) memory and the driver's own reservation, which torch's counters do not see.
    """
    if device.type != "cuda":
        return {}
    reading = {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
    }
    used = nvml_used_bytes(device)
    if used is not None:
        reading["device_used_gib"] = round(used / GIB, 3)
    return reading


def allocated_bytes(device: torch.device) -> int | None:
    """What torch's tensors hold on the device now (CUDA), None on CPU."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def reset_peaks(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def nvml_used_bytes(device: torch.device) -> int | None:
    """Device memory in use as the driver sees it (nvidia-ml-py), or None where NVML is missing."""
    read = nvml_reader(device)
    return read() if read else None


def nvml_reader(device: torch.device):
    """A function that reads the device memory in use (bytes), or None where NVML is missing.

    It reads NVML's memory info in its first version, whose `used` is what the driver reserves for
    itself plus what every process allocated: what a card's owner has to fit the run into. So it is
    not zero on an idle card, where nvidia-smi's `memory.used` (which leaves the reservation out) is;
    `nvml_reserved_bytes` reads the reservation alone."""
    found = _nvml_handle(device)
    if found is None:
        return None
    pynvml, handle = found
    return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used


def nvml_reserved_bytes(device: torch.device) -> int | None:
    """What the driver and firmware reserve for themselves on `device` (NVML's memory info, second
    version), counted in `nvml_reader`'s reading from before any process starts; None where NVML,
    or its second version, is missing."""
    found = _nvml_handle(device)
    if found is None:
        return None
    pynvml, handle = found
    try:
        return pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2).reserved
    except (pynvml.NVMLError, AttributeError, TypeError):  # an older driver, or an older nvidia-ml-py
        return None


def _nvml_handle(device: torch.device):
    """(the pynvml module, `device`'s NVML handle), or None where NVML is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetMemoryInfo(handle)
    except pynvml.NVMLError:
        return None
    return pynvml, handle


class DeviceUsedPeak:
    """The most device memory in use while the `with` block runs, read every `interval_s` by a
    background thread: what a card's size has to cover, loading and every step included.

    A reading after each step can miss what a step frees before it ends (library workspaces,
    memory torch hands back after an out-of-memory retry); a thread sees those too, at a cost of
    one driver call every 10 ms. `read` returns bytes (default: NVML for `device`); without it,
    `peak_bytes` stays None.
    """

    def __init__(self, device: torch.device | None = None, interval_s: float = 0.01, read=None):
        self.read = read or (nvml_reader(device) if device is not None and device.type == "cuda" else None)
        self.interval_s = interval_s
        self.peak_bytes = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.read())

    def __enter__(self):
        if self.read:
            self.peak_bytes = self.read()
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.read:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self.read())


# --- Where the memory goes, counted tensor by tensor -----------------------------------------------
#
# torch.cuda.memory_allocated() says how much torch's tensors hold, not whose they are. Counting
# the tensors themselves splits it into parts: the 4-bit weights and their quantization state, the
# other weights, the LoRA parameters and their gradients, and the optimizer state. What the peak
# holds beyond those parts is activations and temporaries. The counting works on any device (the
# tests run it on CPU tensors); the check against torch's counters needs CUDA.

TOLERANCE_GIB = 0.1  # counted persistent parts vs torch's allocated memory at rest


def tensor_bytes(tensors, seen: set, device_type: str | None = None) -> int:
    """Bytes of the tensors not counted yet, on `device_type` (or any). Tensors that share
    storage (views, tied weights) are counted once, by the storage's address in `seen`.

    >>> w = torch.zeros(4, 8)  # 32 fp32 = 128 bytes
    >>> seen = set()
    >>> tensor_bytes([w, w[:2], w.t()], seen), tensor_bytes([w], seen)
    (128, 0)
    """
    total = 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        if device_type is not None and t.device.type != device_type:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def quant_state_tensors(state) -> list:
    """The tensors of a bitsandbytes QuantState: absmax (8-bit with double quant), the code book,
    the offset, and the nested state's fp32 absmax and code book."""
    if state is None:
        return []
    found = [state.absmax, state.code, getattr(state, "offset", None)]
    return found + quant_state_tensors(getattr(state, "state2", None))


def count_model(model, device_type: str | None = None) -> dict:
    """Bytes of the model's tensors, by part: weights_4bit (packed NF4, 0.5 byte a weight),
    quant_state, weights_other (not quantized, and buffers such as rotary tables), lora_params
    (whatever trains)."""
    try:
        from bitsandbytes.nn import Params4bit
    except ImportError:
        Params4bit = None  # noqa: N806
    seen: set = set()
    parts = {"weights_4bit": 0, "quant_state": 0, "weights_other": 0, "lora_params": 0}
    for param in model.parameters():
        if Params4bit is not None and isinstance(param, Params4bit):
            parts["weights_4bit"] += tensor_bytes([param], seen, device_type)
            parts["quant_state"] += tensor_bytes(quant_state_tensors(param.quant_state), seen, device_type)
        elif param.requires_grad:
            parts["lora_params"] += tensor_bytes([param], seen, device_type)
        else:
            parts["weights_other"] += tensor_bytes([param], seen, device_type)
    parts["weights_other"] += tensor_bytes(model.buffers(), seen, device_type)
    return parts


def count_optimizer(optimizer, device_type: str | None = None) -> dict:
    """Bytes of optimizer state: in device memory, and paged. bitsandbytes' paged buffers are CUDA
    unified memory wrapped as CPU tensors (`is_paged`): told apart by that flag, counted on any
    device, and invisible to torch's counters (NVML sees them)."""
    seen: set = set()
    tensors = [t for state in optimizer.state.values() for t in state.values() if hasattr(t, "untyped_storage")]
    paged = [t for t in tensors if getattr(t, "is_paged", False)]
    plain = [t for t in tensors if not getattr(t, "is_paged", False)]
    return {
        "optimizer_state": tensor_bytes(plain, seen, device_type),
        "optimizer_state_paged": tensor_bytes(paged, seen),
    }


def memory_breakdown(
    model,
    optimizer,
    allocated_before_loop: int | None,
    peaks: dict,
    device: torch.device,
    allocated_before_run: int = 0,
) -> dict:
    """Where the loop's peak memory went, in GiB. Call it between steps (gradients freed).

    Counted tensor by tensor: 4-bit weights (with their quantization state), other weights and
    buffers, LoRA parameters, their gradients (one per LoRA parameter, same dtype; counted whole,
    though at the peak, usually early in backward, only part of them may exist) and the optimizer
    state. On CUDA, derived from `peaks` (a `memory_gib` reading):
    activations at peak = peak allocated - (weights + LoRA + gradients + optimizer state), i.e.
    saved activations, recomputed blocks, logits, loss buffers, dequantized tiles, workspaces;
    allocator beyond = peak reserved - peak allocated (torch's cache and fragmentation).
    Check: the persistent parts are compared with torch.cuda.memory_allocated() at two quiet
    moments, before the loop (weights + LoRA: `allocated_before_loop`) and now (weights + LoRA +
    optimizer state + the gradients that exist now: zero_grad(set_to_none=True) frees them, a CUDA
    graph keeps them; and cuBLAS's workspaces); `adds_up` says whether both agree within TOLERANCE_GIB.
    `allocated_before_run`: what torch held before this run began (an earlier run or a notebook's
    tensors in the same process), a part of its own in all of the above.
    """
    parts = count_model(model, device.type)
    parts["lora_grads"] = parts["lora_params"]
    parts |= count_optimizer(optimizer, device.type)
    out = {f"{k}_gib": round(v / GIB, 6) for k, v in parts.items()}
    out["weights_4bit_gib"] = round((parts["weights_4bit"] + parts["quant_state"]) / GIB, 6)  # incl. quant state
    if device.type != "cuda":
        return out | {"note": "counted parts only: torch's memory counters are CUDA's"}
    persistent = parts["weights_4bit"] + parts["quant_state"] + parts["weights_other"] + parts["lora_params"]
    workspaces = cublas_workspace_bytes(model, optimizer, device)  # alive from their first matmul on
    earlier = allocated_before_run  # not this run's, and in every reading of torch's counters
    at_peak = earlier + persistent + parts["lora_grads"] + parts["optimizer_state"] + workspaces
    peak_allocated = peaks["peak_allocated_gib"] * GIB
    peak_reserved = peaks["peak_reserved_gib"] * GIB
    now = torch.cuda.memory_allocated(device)
    grads_now = tensor_bytes([p.grad for p in model.parameters()], set(), device.type)
    mismatch_before = (
        (allocated_before_loop - earlier - persistent) / GIB if allocated_before_loop is not None else None
    )
    mismatch_now = (now - earlier - persistent - parts["optimizer_state"] - grads_now - workspaces) / GIB
    checks = [m for m in (mismatch_before, mismatch_now) if m is not None]
    out |= {
        "earlier_work_gib": round(earlier / GIB, 4),
        "activations_at_peak_gib": round((peak_allocated - at_peak) / GIB, 4),
        "allocator_beyond_allocated_gib": round((peak_reserved - peak_allocated) / GIB, 4),
        "peak_allocated_gib": peaks["peak_allocated_gib"],
        "peak_reserved_gib": peaks["peak_reserved_gib"],
        "device_used_gib": peaks.get("device_used_gib"),
        "allocated_after_load_gib": round(allocated_before_loop / GIB, 4)
        if allocated_before_loop is not None
        else None,
        "allocated_after_loop_gib": round(now / GIB, 4),
        "cublas_workspaces_gib": round(workspaces / GIB, 4),
        "mismatch_after_load_gib": round(mismatch_before, 4) if mismatch_before is not None else None,
        "mismatch_after_loop_gib": round(mismatch_now, 4),
        "tolerance_gib": TOLERANCE_GIB,
        "adds_up": all(abs(m) <= TOLERANCE_GIB for m in checks),
    }
    if out["device_used_gib"] is not None:
        # NVML's view minus torch's: CUDA context, paged optimizer state, library workspaces.
        out["outside_torch_gib"] = round(out["device_used_gib"] - peaks["peak_reserved_gib"], 4)
    return out


def cublas_workspace_bytes(model, optimizer, device: torch.device) -> int:
    """Bytes of cuBLAS's workspaces alive now. torch gives cuBLAS a workspace for each (handle,
    stream) the first time a matmul runs there (the CUDA graph's capture runs on a stream of its
    own, so it has its own), through the caching allocator: they count in torch's allocated memory,
    though no tensor holds them. Found as the live blocks of a workspace's size that no counted
    tensor (a weight, gradient or optimizer state) owns."""
    size = cublas_workspace_size(device)
    counted = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    counted |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    for state in optimizer.state.values():
        counted |= {t.untyped_storage().data_ptr() for t in state.values() if hasattr(t, "untyped_storage")}
    blocks = [block for segment in torch.cuda.memory_snapshot() for block in segment["blocks"]]
    return sum(
        block["size"]
        for block in blocks
        if block["state"] == "active_allocated"
        and block.get("requested_size", block["size"]) == size
        and block["address"] not in counted
    )


def cublas_workspace_size(device: torch.device) -> int:
    """The bytes of one cuBLAS workspace as torch sizes it: CUBLAS_WORKSPACE_CONFIG where set, else
    torch's default, 4096 KiB x 8 on Hopper and later, 4096 KiB x 2 + 16 KiB x 8 before."""
    ask = getattr(torch._C, "_cuda_getCublasWorkspaceSize", None)  # newer torch tells it itself
    if ask is not None and device.type == "cuda":
        return ask()
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    return workspace_config_bytes(
        os.environ.get("CUBLAS_WORKSPACE_CONFIG") or (":4096:8" if hopper else ":4096:2:16:8")
    )


def workspace_config_bytes(config: str) -> int:
    """CUBLAS_WORKSPACE_CONFIG's `:KIB:COUNT` pairs (one or more) in bytes.

    >>> workspace_config_bytes(":4096:1"), workspace_config_bytes(":4096:2:16:8")
    (4194304, 8519680)
    """
    numbers = [int(n) for n in config.split(":")[1:] if n.strip().isdigit()]
    return sum(kib * count for kib, count in zip(numbers[::2], numbers[1::2], strict=False)) * 1024


# The parts of a breakdown that add up to peak reserved, in order, with how each is known.
BREAKDOWN_PARTS = [
    ("weights_4bit_gib", "4-bit weights (NF4, 0.5 byte each) and their quantization state", "counted"),
    ("weights_other_gib", "other weights and buffers (embeddings, LM head, norms; not quantized)", "counted"),
    ("lora_params_gib", "LoRA parameters", "counted"),
    ("lora_grads_gib", "their gradients", "counted"),
    ("optimizer_state_gib", "optimizer state in device memory", "counted"),
    ("cublas_workspaces_gib", "cuBLAS's workspaces (one for each stream that ran a matmul)", "counted"),
    # Shown only where there is some (shown_parts): memory a run cannot use, which a run alone never has.
    ("earlier_work_gib", "allocated before this run began (an earlier run's or a notebook's tensors)", "counted"),
    ("activations_at_peak_gib", "activations and temporaries at the peak", "peak allocated - the above"),
    (
        "allocator_beyond_allocated_gib",
        "held by torch's allocator beyond that (cache, fragmentation)",
        "peak reserved - peak allocated",
    ),
]


def shown_parts(b: dict) -> list[tuple[str, str, str]]:
    """BREAKDOWN_PARTS as a breakdown shows them: what an earlier run left only where there is some."""
    return [part for part in BREAKDOWN_PARTS if part[0] != "earlier_work_gib" or b.get(part[0], 0.0) >= 0.001]


def format_breakdown(b: dict) -> str:
    """A CUDA breakdown as the few lines the loop prints once, e.g.

    memory at the peak so far (GiB):
      1.741  4-bit weights (NF4, 0.5 byte each) and their quantization state
      ...
      3.201  = peak reserved (torch); 0.008 paged optimizer state and 1.475 more outside torch: 4.676 device used (NVML)
    """
    lines = ["memory at the peak so far (GiB):"]
    lines += [f"  {b.get(key, 0.0):6.3f}  {label}" for key, label, _ in shown_parts(b)]  # 0: not in older records
    total = f"  {b['peak_reserved_gib']:6.3f}  = peak reserved (torch)"
    if b.get("outside_torch_gib") is not None:
        total += (
            f"; {b['optimizer_state_paged_gib']:.3f} of paged optimizer state and more outside torch "
            f"(CUDA context, libraries): {b['device_used_gib']:.3f} device used (NVML)"
        )
    check = "add up" if b["adds_up"] else f"do NOT add up within {b['tolerance_gib']} GiB"
    lines += [total, f"  the counted parts {check} against torch.cuda.memory_allocated()"]
    return "\n".join(lines)


class MemoryReport(Observer):
    """Where the GPU memory went, counted tensor by tensor, once a run: an observer of the loop
    (yoda_raw/hooks.py). It reads torch's allocated memory before the run loads anything, then with
    the model alone, before the optimizer exists, and breaks the peak down at the first log line;
    `breakdown` keeps it.
    Nothing on a CPU, where torch keeps no memory counts."""

    def __init__(self, show: bool = True):
        self.show, self.breakdown = show, None
        self.model = self.optimizer = self.allocated_before_loop = self.device = None
        self.allocated_before_run = 0

    def settled(self, cfg, precision, plan, accelerator) -> None:
        self.allocated_before_run = allocated_bytes(accelerator.device) or 0  # before any weight loads

    def adapted(self, model) -> None:
        self.device = next(model.parameters()).device
        self.allocated_before_loop = allocated_bytes(self.device)

    def loop_start(self, model, optimizer, loader, steps_per_epoch: int, total_steps: int) -> None:
        self.model, self.optimizer = model, optimizer

    def logged(self, record: dict) -> None:
        if self.breakdown is not None or self.device is None or self.device.type != "cuda" or not _is_main_process():
            return
        self.breakdown = self.breakdown_now(record)
        if self.show:
            tqdm.write(format_breakdown(self.breakdown))

    def breakdown_now(self, record: dict) -> dict:
        """The breakdown with the peaks of `record` (a logged record, e.g. the run's last)."""
        unwrapped = getattr(self.model, "module", self.model)  # DDP's wrapper holds the model
        return memory_breakdown(
            unwrapped, self.optimizer, self.allocated_before_loop, record, self.device, self.allocated_before_run
        )


def _is_main_process() -> bool:
    from accelerate import PartialState

    return PartialState().is_main_process


# --- the loop's log: a record every --logging-steps --------------------------------------------


def new_window(device: torch.device) -> dict:
    """Running sums of one logging window, kept on the device so that adding to them never syncs."""
    return {
        "loss": torch.zeros((), device=device),
        "tokens": 0,
        "supervised": 0,
        "steps": 0,
        "start": time.perf_counter(),
    }


class Log:
    """The loop's logging: running sums on the device between log lines, then one record a line:
    on the progress bar, in metrics.jsonl, to the trackers and to the observer."""

    def __init__(self, accelerator, out: Path, start_step: int, total_steps: int,
                 steps_per_epoch: int, flops_per_token: float, batch_size: int, observer: Observer):  # fmt: skip
        self.accelerator, self.out, self.observer = accelerator, out, observer
        self.steps_per_epoch, self.flops_per_token, self.batch_size = steps_per_epoch, flops_per_token, batch_size
        self.bar = tqdm(
            total=total_steps, initial=start_step, disable=not accelerator.is_main_process, desc="training", unit="step"
        )
        self.records, self.skipped = [], 0
        self.started = time.perf_counter()
        self.window = new_window(accelerator.device)

    @property
    def unlogged_steps(self) -> int:
        """Steps added since the last log line."""
        return self.window["steps"]

    def add(self, loss_share: torch.Tensor, micro_batches: list[dict], supervised, skipped: bool) -> None:
        """One step into the window: this process's share of its loss, its tokens (no host sync)."""
        self.window["loss"] += loss_share  # summed over processes at the log line
        self.window["tokens"] += sum(b["attention_mask"].sum() for b in micro_batches)
        self.window["supervised"] += supervised
        self.window["steps"] += 1
        self.skipped += int(skipped)  # fp16: updates the loss scaler skipped
        self.bar.update(1)

    def write(self, step: int, lr: float, grad_norm) -> dict:
        """The window as a record, written out; a new window begins. Sync point (log_window)."""
        record = log_window(
            self.window, step, self.steps_per_epoch, lr, grad_norm, self.flops_per_token, self.accelerator
        )
        record |= {"skipped_steps": self.skipped, "batch_size": self.batch_size}  # what --auto-batch-size settled on
        record["elapsed_s"] = round(time.perf_counter() - self.started, 2)  # the first includes compiling
        self.records.append(record)
        write_record(record, self.accelerator, self.bar, self.out)
        self.observer.logged(record)
        self.window = new_window(self.accelerator.device)
        return record


def log_window(
    window: dict, step: int, steps_per_epoch: int, lr: float, grad_norm, flops_per_token: float, accelerator
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
    return (
        record
        | mfu(tokens / seconds, flops_per_token, accelerator.device, accelerator.num_processes)
        | memory_gib(accelerator.device)
    )


def write_record(record: dict, accelerator, bar: tqdm, out: Path) -> None:
    """Show a logged record on the progress bar, append it to metrics.jsonl, pass it to the trackers."""
    if accelerator.is_main_process:
        shown = {key: record[key] for key in ("loss", "lr", "tokens_per_s", "mfu") if key in record}
        if "peak_allocated_gib" in record:
            shown["peak_gib"] = record["peak_allocated_gib"]
        bar.set_postfix(shown)
        output.append_metrics(out, record)
    accelerator.log(record, step=record["step"])
