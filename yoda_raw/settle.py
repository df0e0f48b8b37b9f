"""The options as run: every `auto` settled once, from the machine and the model's config.

config.py checks each option's value on its own (types, ranges, choices) as it is read. What the
options mean for this run depends on where it runs and on what model it loads, and each answer
depends on the ones before, so they are settled here in that order, before any weights load:

1. --precision auto: bf16 where the GPU does it natively, else fp32 (precision.py);
2. --quant auto: 4-bit NF4 on a CUDA GPU, unquantized elsewhere (model.py); --chunked-loss auto:
   on a CUDA GPU, where the logits of long rows are the step's largest tensors (loss.py);
   --offload-activations: only a GPU has other memory to offload to (offload.py);
3. the LoRA targets when none are given: every linear layer but the LM head (model.py);
   --uncheckpointed-layers against the model's layer count, --max-length against its context;
4. the fast path's options, from all of the above (fast/__init__.py).

The settled Config is what the run prints, saves in run_config.json, and trains with: a mistake
costs seconds, and a result can always be traced to what made it.
"""

import dataclasses

import torch

from yoda_raw import fast, halves
from yoda_raw.config import LOSS_CHUNK, Config
from yoda_raw.errors import YodaError
from yoda_raw.model import check_uncheckpointed_layers, choose_lora_targets, resolve_quant, skeleton
from yoda_raw.precision import Precision, choose_precision


def settle(cfg: Config, device: torch.device, num_processes: int, model_config) -> tuple[Config, Precision, fast.Plan]:
    """(the Config as run, its precision, its fast-path plan) for `num_processes` processes on `device`."""
    precision = choose_precision(cfg.precision, device)
    quant = resolve_quant(cfg.quant, device)
    chunked_loss = cfg.chunked_loss if cfg.chunked_loss != "auto" else ("on" if device.type == "cuda" else "off")
    if chunked_loss == "off" and cfg.loss_chunk != LOSS_CHUNK:
        raise YodaError(
            f"--loss-chunk {cfg.loss_chunk} sizes the chunked loss's chunks, and the loss is not chunked here; "
            "drop --loss-chunk, or add --chunked-loss on"
        )
    offload_activations = resolve_offload(cfg.offload_activations, device)
    skeleton_model = skeleton(model_config, cfg.trust_remote_code)
    split_layers = resolve_split(cfg, skeleton_model)
    targets = choose_lora_targets(cfg.lora_targets, skeleton_model, cfg.model)
    check_uncheckpointed_layers(cfg, skeleton_model)
    context = model_config.max_position_embeddings
    if cfg.max_length > context:
        raise YodaError(f"--max-length {cfg.max_length} is longer than the model's context of {context} tokens")
    settled_split = dataclasses.replace(cfg, split_layers=split_layers)  # --lora-addmm's auto follows the split
    plan = fast.settle(settled_split, device, num_processes, precision.name, quant, skeleton_model)
    cfg = dataclasses.replace(
        cfg,
        quant=quant,
        chunked_loss=chunked_loss,
        offload_activations=offload_activations,
        split_layers=split_layers,
        lora_targets=targets,
        **plan.options(),
    )
    return cfg, precision, plan


def resolve_split(cfg: Config, skeleton_model) -> str:
    """--split-layers auto|on|off -> "on" or "off". auto is off: it costs speed (benchmarks/NOTES.md);
    on splits checkpointed layers, and a layout halves.py does not know is refused."""
    if cfg.split_layers != "on":
        if cfg.mlp_chunk:
            raise YodaError(
                f"--mlp-chunk {cfg.mlp_chunk} checkpoints the MLP half of each split layer in chunks, and the layers "
                "are not split; add --split-layers on, or drop --mlp-chunk"
            )
        return "off"
    if not cfg.gradient_checkpointing:
        raise YodaError(
            "--split-layers on checkpoints each layer as two halves, and --no-gradient-checkpointing turns "
            "checkpointing off; drop one of them"
        )
    halves.check_layout(skeleton_model)
    return "on"


def resolve_offload(setting: str, device: torch.device) -> str:
    """--offload-activations auto|on|off -> "on" or "off". auto is off: the copies are not all
    hidden behind compute, and cost a few percent of the speed (benchmarks/NOTES.md)."""
    if setting == "on" and device.type != "cuda":
        raise YodaError(
            "--offload-activations on moves what the forward saves from a GPU's memory to the host's, and this run "
            f"is on the {device.type.upper()}, whose memory is the host's; use --offload-activations off"
        )
    return "on" if setting == "on" else "off"
