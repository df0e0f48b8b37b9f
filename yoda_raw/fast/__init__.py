"""The fast path: every speed lever of yoda_raw, behind one door.

train.py is the recipe as a reader learns it: an eager loop, micro-batch by micro-batch. On one
CUDA GPU that loop mostly waits (launching tens of thousands of small kernels a step costs more than
running them), and these levers make the same loop fast. Each lives in its own module here and is
an option of its own, `auto` by default: on where it runs and pays, off elsewhere.

    graphs.py    --cuda-graph      a micro-batch's forward and backward recorded once, replayed after
    compile.py   --compile-layers  each decoder layer compiled: its element-wise kernels fused
                 --compile-memory-budget  what a compiled layer keeps for its backward
    dequant.py   --reuse-dequant   each 4-bit weight dequantized once for the recompute and backward
                 --fp8-matmuls     the frozen weights' products in FP8 (Hopper GPUs)
    dropout.py   --seeded-dropout  LoRA's dropout masks from one seed, recomputed, never stored
    lora.py      --lora-addmm      LoRA's product added to the base's inside its matmul
    flat.py      (with the graph)  every LoRA tensor updated by one 8-bit AdamW kernel
    kernels.py   the Triton kernels of dequant.py and dropout.py

The loop meets them at four calls, and nowhere else:

    plan = fast.settle(...)                   # once, at start: what is on, and why (printed, saved)
    fast.apply(plan, model)                   # the model's levers, before the first step
    optimizer = fast.optimizer(plan, optimizer)
    step = fast.step(plan, eager_step, ...)   # the CUDA graph's step, or the eager one as it is

A new lever: its module here, its option in config.py, its line in `settle` and in `apply` (or
`step`), and its tests. Nothing in train.py or model.py changes.
"""

import dataclasses

import torch

from yoda_raw.errors import YodaError
from yoda_raw.fast import compile, dequant, dropout, flat, graphs, lora
from yoda_raw.model import decoder_layers


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the fast path does in this run: each option "on" or "off", settled from `auto`."""

    cuda_graph: str
    compile_layers: str
    reuse_dequant: str
    fp8_matmuls: str
    seeded_dropout: str
    compile_memory_budget: float = 1.0  # torch.compile's own default: keep what the partitioner chooses
    why_eager: str = ""  # why the CUDA graph cannot run here, where it cannot: the lever the others build on
    lora_addmm: str = "off"

    @property
    def flat_optimizer(self) -> bool:
        """The flat optimizer needs gradients that are never freed: the graph's loop keeps them."""
        return self.cuda_graph == "on"

    def options(self) -> dict:
        """The settled options, as Config takes them (run_config.json saves them so)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "why_eager"}

    def __str__(self) -> str:
        """One line for the start of a run, e.g. `fast path: off (the CUDA graph needs a CUDA GPU): the eager loop`."""
        on = [name.replace("_", "-") for name, value in self.options().items() if value == "on"]
        on += ["flat optimizer"] if self.flat_optimizer else []
        on += [f"compile-memory-budget {self.compile_memory_budget:g}"] if self.compile_memory_budget < 1 else []
        if not on:
            why = f"the CUDA graph {self.why_eager}" if self.why_eager else "every lever off"
            return f"fast path: off ({why}): the eager loop"
        return "fast path: " + ", ".join(on)


def settle(cfg, device: torch.device, num_processes: int, precision_name: str, quant: str, skeleton_model) -> Plan:
    """Every speed option's `auto` settled, and every combination that cannot run refused, here and
    only here, in the order each depends on the ones before. `quant`: --quant as settled;
    `skeleton_model`: the model's modules without weights (layer count and shapes)."""
    if cfg.reuse_dequant == "on" and not cfg.gradient_checkpointing:
        raise YodaError(
            "--reuse-dequant on keeps each layer's dequantized weights from the recompute to the backward, so "
            "it needs gradient checkpointing; drop --no-gradient-checkpointing or use --reuse-dequant off"
        )
    if cfg.seeded_dropout == "on" and cfg.lora_dropout == 0:
        raise YodaError(
            "--seeded-dropout on makes LoRA's dropout masks, and --lora-dropout is 0 (no dropout); "
            "drop --seeded-dropout on or set --lora-dropout"
        )
    # 1. The CUDA graph: one CUDA GPU, one process, no fp16 loss scaler.
    why_eager = graphs.why_not(device, num_processes, precision_name)
    graph = graphs.resolve(cfg.cuda_graph, why_eager)
    # 2. Compiled layers: where the graph is (they pay inside it), and Triton is there.
    compiled = compile.resolve(cfg.compile_layers, graph, device)
    if compiled == "off" and cfg.compile_memory_budget < 1:
        raise YodaError(
            f"--compile-memory-budget {cfg.compile_memory_budget:g} shares out what compiled layers keep for "
            "their backward, and the layers are not compiled here; drop it, or add --compile-layers on"
        )
    # 3. Seeded dropout: in the compiled graph, where torch's dropout costs most.
    seeded = dropout.resolve(cfg.seeded_dropout, graph == "on" and compiled == "on", cfg.lora_dropout)
    # 4. FP8 matmuls: where they pay (compiled layers in the graph, bf16, a 4-bit
    #    base computed in bf16, checkpointing), on Hopper, for shapes cuBLAS's FP8 matmul takes.
    fast_path = (
        graph == "on"
        and compiled == "on"
        and precision_name == "bf16"
        and quant == "nf4"
        and cfg.quant_compute_dtype == "auto"
        and cfg.gradient_checkpointing
        and cfg.reuse_dequant != "off"
    )
    fp8 = dequant.resolve_fp8(cfg.fp8_matmuls, fast_path, device, skeleton_model)
    # 5. Dequantizing once: in the graph, with a 4-bit base and checkpointing (FP8 runs inside it).
    reuse = dequant.resolve(cfg.reuse_dequant, graph, quant, cfg.gradient_checkpointing, fp8)
    layers = len(decoder_layers(skeleton_model))
    if reuse == "on" and fp8 == "off" and cfg.uncheckpointed_layers == layers:
        raise YodaError(
            f"--reuse-dequant on works in the checkpointed layers, and --uncheckpointed-layers {layers} leaves none; "
            "use fewer uncheckpointed layers or --reuse-dequant off"
        )
    # 6. LoRA's add inside its matmul: in compiled split halves, where the add was a kernel of its own.
    addmm = lora.resolve(cfg.lora_addmm, cfg.split_layers == "on" and compiled == "on")
    why = why_eager if graph == "off" else ""
    return Plan(graph, compiled, reuse, fp8, seeded, cfg.compile_memory_budget, why, addmm)


def apply(plan: Plan, model) -> None:
    """The plan's levers on the LoRA model, in the order they must come: the dropout and the matmuls
    are swapped in before compiling, which traces them."""
    if plan.seeded_dropout == "on":
        dropout.use_seeded_dropout(model)
    if plan.lora_addmm == "on":
        lora.use_addmm(model)
    if plan.reuse_dequant == "on" or plan.fp8_matmuls == "on":
        dequant.reuse_dequantized_weights(model, fp8=plan.fp8_matmuls == "on")
    if plan.fp8_matmuls == "on":  # with --mlp-chunk: one cast of the MLP's weights for all its chunks
        dequant.share_between_chunks(model)
    if plan.compile_layers == "on":
        compile.compile_layers(model, plan.compile_memory_budget)  # compiled lazily, at the first step


def optimizer(plan: Plan, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """With the graph, the same update over one flat tensor (where it is exactly the same)."""
    return flat.flat_optimizer(optimizer) if plan.flat_optimizer else optimizer


def step(plan: Plan, eager_step, model, rows: int, max_length: int, pad_id: int, device: torch.device):
    """The CUDA graph's step for `rows` x `max_length` micro-batches (its loss computed as the eager
    step's), or `eager_step` as it is."""
    if plan.cuda_graph == "off":
        return eager_step
    return graphs.GraphStep(model, rows, max_length, pad_id, device, eager_step.loss_chunk, eager_step.offload)
