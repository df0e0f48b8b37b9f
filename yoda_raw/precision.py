"""Which floating-point format the run computes in: decided once, here.

One decision sets three things together, so they can never disagree:
- the autocast dtype of the forward pass (through Accelerate's `mixed_precision`),
- the compute dtype of the 4-bit matmuls (bitsandbytes dequantizes NF4 weights to this dtype),
- the dtype the non-quantized base weights are loaded in.

`auto` follows the tutorial (`bf16=torch.cuda.is_bf16_supported()`) with one correction:
`torch.cuda.is_bf16_supported()` also answers True on a T4 (compute capability 7.5), where bf16
is emulated and slow. Native bf16 needs compute capability 8.0 (Ampere) or newer, so that is what
we check. Everything else (CPU, older GPUs) runs fp32. fp16 is never chosen for you: it needs
gradient scaling and can overflow, so it is an explicit opt-in for cards without bf16.
"""

from dataclasses import dataclass

import torch

from yoda_raw.errors import YodaError


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" | "fp16" | "fp32"
    dtype: torch.dtype  # autocast dtype and 4-bit compute dtype
    mixed_precision: str  # what accelerate.Accelerator(mixed_precision=...) gets (fp16 brings a loss scaler)


_PRECISIONS = {
    "bf16": Precision("bf16", torch.bfloat16, "bf16"),
    "fp16": Precision("fp16", torch.float16, "fp16"),
    "fp32": Precision("fp32", torch.float32, "no"),
}


def native_bf16(device: torch.device) -> bool:
    """True when the device does bf16 in hardware: CUDA compute capability >= 8.0."""
    if device.type != "cuda":
        return False
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def choose_precision(requested: str, device: torch.device) -> Precision:
    """auto -> bf16 where the GPU does it natively, else fp32 (config.py checks the name).

    >>> choose_precision("auto", torch.device("cpu")).name
    'fp32'
    """
    if requested == "auto":
        return _PRECISIONS["bf16" if native_bf16(device) else "fp32"]
    if requested == "fp16" and device.type != "cuda":
        raise YodaError("--precision fp16 needs a CUDA GPU (gradient scaling); use --precision fp32 or bf16 on a CPU")
    return _PRECISIONS[requested]
