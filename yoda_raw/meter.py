"""Measuring the loop: tokens/s, model FLOPs utilisation and memory. Shared by train.py and benchmarks/.

Vocabulary: a *token* is a non-pad input position; a *supervised token* is one whose next-token
label is not -100 (what the loss is averaged over). Throughput is per second of step time.
"""

import torch

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


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_gib(device: torch.device) -> dict:
    """Peak memory since start (or since `reset_peaks`), in GiB. Empty on CPU.

    peak_allocated_gib: the most torch's tensors held at once;
    peak_reserved_gib: what torch's caching allocator held from the driver (>= allocated);
    device_used_gib: what NVML says the whole device uses now, which also counts the CUDA context
    and unified (paged) memory, which torch's counters do not see.
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
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used
    except pynvml.NVMLError:
        return None
