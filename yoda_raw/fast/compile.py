"""--compile-layers: each decoder layer compiled with torch.compile, on its own (with
--split-layers, each of its two halves: halves.py).

Why a layer and not the model: the layers are alike, so one compiled code serves all of them and
compiles in seconds, where the whole model takes minutes. A layer is where the many small
element-wise kernels are (norms, rotary embeddings, the MLP's activation, LoRA's dropout, scaling
and add); compiling fuses them into a few, while the 4-bit matmuls stay bitsandbytes' own (or
dequant.py's). It pays inside the CUDA graph, whose replay leaves the GPU only the kernels' own
time; eagerly, launching kernels costs more than running them, and on a CPU compiled layers are
slower than eager ones.
"""

import os

import torch
import torch._functorch.config  # activation_memory_budget
from torch.utils._triton import has_triton

from yoda_raw.errors import YodaError
from yoda_raw.halves import compile_units

RECOMPILE_LIMIT = 64  # compiled codes kept for each layer's code: shapes, forward and recompute


def resolve(setting: str, cuda_graph: str, device: torch.device) -> str:
    """--compile-layers auto|on|off -> "on" or "off". auto follows the CUDA graph. On a GPU,
    torch.compile writes its kernels with Triton (compute capability 7.0+ and the triton package):
    without it auto is off, and on is one line instead of a traceback at the first step.

    >>> cpu = torch.device("cpu")
    >>> resolve("auto", "off", cpu), resolve("auto", "on", cpu), resolve("on", "off", cpu)
    ('off', 'on', 'on')
    """
    if device.type == "cuda" and setting != "off" and not has_triton():
        if setting == "on":
            raise YodaError(
                "--compile-layers on needs Triton for this GPU (compute capability 7.0 or more, and "
                "`pip install triton`); use --compile-layers off"
            )
        return "off"
    return cuda_graph if setting == "auto" else setting


def compile_layers(model, memory_budget: float = 1.0) -> None:
    """torch.compile every decoder layer, lazily: each compiles at its first call. dynamic=False:
    the shapes are fixed (wrapped packing, and the CUDA graph's buffers); a short last batch
    compiles once more.

    `memory_budget` (--compile-memory-budget): compiling a layer splits its forward and backward into
    two graphs, and a partitioner chooses what the forward hands the backward. With checkpointing,
    that forward is the layer's recompute, run just before its backward, and what it hands over is
    the biggest part of the step's peak at long rows: the MLP's wide outputs above all. At 1 the
    partitioner keeps whatever saves time; below 1 it keeps at most that share of what it could
    keep, recomputing the cheapest of the rest (element-wise work first) inside the backward."""
    # A setting of the process, read when a layer compiles (at its first call): set by every run.
    torch._functorch.config.activation_memory_budget = memory_budget
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:  # the variable, when set, still decides
        # The kernels compile here, in this process, with no pool of compile workers: each worker is
        # a new Python that imports torch, stays in memory for the whole run and is slow to shut down,
        # and a single layer's few dozen kernels do not compile sooner with them.
        torch._inductor.config.compile_threads = 1
    # Every batch shape a run meets compiles once more: --auto-batch-size's retries, a short last
    # batch, --mlp-chunk's last chunk, a benchmark's probes in one process. All layers share one
    # compiled code and so one cache, which torch caps at 8 entries; past that it runs new shapes
    # eagerly, and a layer whose forward ran compiled and whose recompute runs eagerly (or the other
    # way) saves other tensors, which checkpointing refuses with an error. So the cap is raised.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for unit in compile_units(model):  # the decoder layers, or with --split-layers their halves
        unit.compile(dynamic=False)
