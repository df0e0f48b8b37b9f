"""The fast path's two Triton kernels, used on a CUDA GPU only (Triton comes with torch's CUDA
builds; a CPU computes the same values otherwise: bitsandbytes' dequantization, a seeded torch
generator). Each is reached through a custom op, so that
torch.compile calls it as it is.

nf4_to_e4m3 (--fp8-matmuls on, through dequant.weight_in_e4m3): a packed 4-bit (NF4) weight
straight to e4m3. bitsandbytes' dequantization writes the weight in bf16 (2 bytes a value) for the
cast to e4m3 to read again (2 bytes) and write (1 byte): 5.5 bytes moved a value, twice a step for
every frozen weight with checkpointing. This kernel reads the packed weight (half a byte a value)
and writes e4m3 (1 byte): 1.5. The layout it reads is bitsandbytes': two 4-bit codes a byte, the
high half first; each code picks one of the 16 values of `code` (NF4's), multiplied by its block's
scale (absmax: one fp32 a block of `blocksize` values, already dequantized where double
quantization packed them too).

dropout_mask (--seeded-dropout on, through dropout.dropout_mask): LoRA's dropout mask from one seed,
four elements from each Philox call (compiled dropout uses one call an element).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def nf4_to_e4m3_kernel(packed_ptr, absmax_ptr, code_ptr, inverse_scale_ptr, out_ptr, n_values,
                       BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr):  # fmt: skip
    """One program: BYTES packed bytes -> 2 x BYTES values (value x inverse_scale) in out's dtype
    (e4m3 in use; the store rounds to it, to nearest even)."""
    n_bytes = (n_values + 1) // 2
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    in_range = byte < n_bytes
    packed = tl.load(packed_ptr + byte, mask=in_range, other=0).to(tl.int32)
    # A byte's two values are neighbours; the block size is even, so they share a block. (A constant:
    # a division by a power of two compiles to a shift.)
    block_scale = tl.load(absmax_ptr + (2 * byte) // BLOCKSIZE, mask=in_range, other=0.0)
    inverse_scale = tl.load(inverse_scale_ptr)
    high = tl.load(code_ptr + (packed >> 4)) * block_scale * inverse_scale
    low = tl.load(code_ptr + (packed & 15)) * block_scale * inverse_scale
    value = tl.program_id(0) * 2 * BYTES + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + value, tl.interleave(high, low), mask=value < n_values)


def nf4_to_e4m3(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, inverse_scale: torch.Tensor,
                blocksize: int, out: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Fill `out` (the weight's shape; e4m3, or fp32 for a test in Triton's interpreter, whose fp8
    rounding is not the GPU's) from the packed weight; returns it."""
    bytes_per_program = 1024
    grid = (triton.cdiv(packed.numel(), bytes_per_program),)
    nf4_to_e4m3_kernel[grid](
        packed, absmax, code, inverse_scale, out, out.numel(), BLOCKSIZE=blocksize, BYTES=bytes_per_program
    )
    return out


@triton.jit
def dropout_mask_kernel(seed_ptr, out_ptr, n_values, threshold, GROUPS: tl.constexpr):
    """One program: 4 x GROUPS booleans, each True where its 32-bit random number is >= threshold."""
    group = tl.program_id(0) * GROUPS + tl.arange(0, GROUPS)
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), group)  # four numbers from one Philox call
    keep = tl.join(tl.join(r0 >= threshold, r1 >= threshold), tl.join(r2 >= threshold, r3 >= threshold))
    value = tl.program_id(0) * 4 * GROUPS + tl.arange(0, 4 * GROUPS)
    tl.store(out_ptr + value, tl.reshape(keep, (4 * GROUPS,)), mask=value < n_values)


def dropout_mask(seed: torch.Tensor, p: float, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (bool) with the mask of `seed`: each element True with probability 1 - p (to one
    part in 2^32); returns it."""
    groups_per_program = 1024
    threshold = round(p * 2**32)
    grid = (triton.cdiv(out.numel(), 4 * groups_per_program),)
    dropout_mask_kernel[grid](seed, out, out.numel(), threshold, GROUPS=groups_per_program)
    return out
