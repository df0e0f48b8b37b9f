"""The run configuration: one dataclass whose defaults are the tutorial's recipe.

Every option of run.py is a field here; transformers' HfArgumentParser turns the fields into
command-line options (`--lora-dropout` and `--lora_dropout` both work; a boolean that defaults to
true also gets `--no-NAME`). A preset (`--preset tiny`) or a YAML file (`--config FILE.yaml`)
replaces the defaults; options given on the command line win over both.

`parse_config` does that for run.py and for `python -m yoda_raw.trace`, which take the same options.

Each value is checked here, once, as it is read (types, ranges, choices). The `auto` values are
settled when the run starts, from the machine and the model's config (yoda_raw/settle.py).

A run prints the options that differ from the defaults at start, and saves the whole settled
configuration as `run_config.json` next to every checkpoint and adapter, so a result can always be
traced back to the settings that made it.
"""

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

from yoda_raw.errors import YodaError

LOSS_CHUNK = 1024  # --loss-chunk's default: 1,024 x 32,064 fp32 logits are 131 MB, little beside a long step's peak

TUTORIAL_MODEL = "microsoft/Phi-3-mini-4k-instruct"
TUTORIAL_DATASET = "dvgodoy/yoda_sentences"
TINY = "tiny"  # --model tiny / --tokenizer tiny: built in-process by yoda_raw/tiny.py
TINY_DATASET = str(Path(__file__).parent / "tiny_yoda.jsonl")


@dataclass
class Config:
    # --- what to train ---------------------------------------------------------------------------
    preset: Literal["tutorial", "smol", "tiny"] = field(
        default="tutorial",
        metadata={
            "help": "tutorial: Phi-3-mini on the yoda set (a GPU). smol: SmolLM2-135M-Instruct, real Yoda speak "
            "on a CPU in minutes. tiny: a tiny random Phi-3 on ~50 shipped pairs."
        },
    )
    model: str = field(default=TUTORIAL_MODEL, metadata={"help": "Hub id or local folder of a causal LM."})
    tokenizer: str | None = field(default=None, metadata={"help": "Hub id or local folder; default: --model."})
    init: Literal["pretrained", "random"] = field(
        default="pretrained",
        metadata={"help": "random: build the model from its config with random weights (profiling, no download)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code shipped with a model repo. Off unless asked."}
    )

    # --- data -----------------------------------------------------------------------------------
    dataset: str = field(
        default=TUTORIAL_DATASET,
        metadata={"help": "Hub id, a .jsonl/.json/.csv/.parquet file, or a save_to_disk folder."},
    )
    prompt_field: str = field(default="sentence", metadata={"help": "Column that becomes the user turn."})
    response_field: str = field(
        default="translation_extra", metadata={"help": "Column that becomes the assistant turn."}
    )
    skip_invalid: bool = field(
        default=False, metadata={"help": "Drop invalid rows (and say how many) instead of stopping."}
    )
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Share of conversations held out for evaluation (0: train on all)."}
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "A system message in front of every conversation without one, in training, evaluation and "
            "generation alike (default: none; the chat template may add its own)."
        },
    )
    train_on: Literal["assistant", "all"] = field(
        default="assistant",
        metadata={"help": "assistant: loss on assistant tokens only. all: every token, as the tutorial trained."},
    )
    packing: Literal["wrapped", "none"] = field(
        default="wrapped",
        metadata={
            "help": "wrapped: join all conversations and cut rows of max_length tokens (SFTTrainer's). "
            "none: one conversation per row."
        },
    )
    max_length: int = field(default=64, metadata={"help": "Tokens per row."})
    shuffle: bool = field(
        default=True, metadata={"help": "Shuffle conversations before packing and rows every epoch (seeded)."}
    )

    # --- model and adapter ----------------------------------------------------------------------
    quant: Literal["nf4", "none", "auto"] = field(
        default="nf4",
        metadata={
            "help": "nf4: 4-bit NF4 base with double quantization. none: unquantized base. "
            "auto: nf4 on a CUDA GPU, none on a CPU."
        },
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata={"help": "auto: bf16 on GPUs with native bf16 (compute capability >= 8.0), else fp32."},
    )
    quant_compute_dtype: Literal["auto", "float32"] = field(
        default="auto",
        metadata={"help": "dtype of the 4-bit matmuls. auto follows --precision; float32 is the tutorial's."},
    )
    fp32_frozen: bool = field(
        default=False,
        metadata={
            "help": "Upcast frozen norms, embeddings and LM head to fp32, as prepare_model_for_kbit_training does."
        },
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Recompute activations in backward (less memory, about a third more compute)."}
    )
    uncheckpointed_layers: int = field(
        default=0,
        metadata={
            "help": "Leave the last N decoder layers out of checkpointing: faster by N layers' recompute, "
            "for N layers' activations of memory."
        },
    )
    cuda_graph: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "Replay each micro-batch's forward and backward as a CUDA graph. auto: on where it can run "
            "(one CUDA GPU, bf16 or fp32); off: the plain eager loop."
        },
    )
    compile_layers: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "torch.compile each decoder layer (fused element-wise kernels; seconds of compiling at the "
            "first step). auto: on with the CUDA graph, off elsewhere."
        },
    )
    compile_memory_budget: float = field(
        default=1.0,
        metadata={
            "help": "What a compiled layer keeps from its recompute for its backward, as a share of what it could "
            "keep (0 to 1); below 1 the rest is recomputed in the backward: less memory at long rows, some speed."
        },
    )
    reuse_dequant: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "Dequantize each 4-bit weight once for the recompute and the backward, not twice. Needs "
            "checkpointing and a 4-bit base. auto: on with the CUDA graph."
        },
    )
    fp8_matmuls: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "The frozen 4-bit weights' products in FP8 (e4m3), close to bf16's, not equal. auto: on in the "
            "fast path on Hopper GPUs (docs/fast-path.md); off: the compute dtype."
        },
    )
    chunked_loss: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "The LM head and cross-entropy over --loss-chunk positions at a time, never every position's "
            "logits at once (less memory at long rows). auto: on a CUDA GPU."
        },
    )
    loss_chunk: int = field(
        default=LOSS_CHUNK,
        metadata={
            "help": "Positions a chunk of the chunked loss: its logits, fp32 for the softmax, and their gradient are "
            "what the loss holds at once. Fewer: less memory where the loss is the step's peak (short rows), for a "
            "little speed (docs/troubleshooting.md)."
        },
    )
    offload_activations: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "What the forward saves for the backward (each checkpointed layer's input) waits in host memory, "
            "copied beside the compute (less memory at long rows). auto: off; on needs a CUDA GPU."
        },
    )
    split_layers: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "Checkpoint each decoder layer as two halves, attention and MLP, so that their recomputed "
            "products are never alive together (less memory at long rows; one more kept tensor a layer). "
            "auto: off; on needs gradient checkpointing."
        },
    )
    mlp_chunk: int = field(
        default=0,
        metadata={
            "help": "With --split-layers on, each layer's MLP checkpointed this many tokens at a time, so that its "
            "recomputed products (the step's widest) are a chunk's (less memory at long rows, for some speed). "
            "0: the whole micro-batch at once."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    seeded_dropout: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "LoRA's dropout masks from one seed a module and micro-step (other masks than torch's, the same "
            "distribution). auto: on in the fast path; off: torch's dropout."
        },
    )
    lora_addmm: Literal["auto", "on", "off"] = field(
        default="auto",
        metadata={
            "help": "LoRA's product added to the base product inside its matmul (torch.addmm), not written out "
            "and added after (the same sum, rounded once). auto: on with --split-layers on in compiled layers (less "
            "memory at the same speed); off elsewhere, where it costs speed (docs/fast-path.md)."
        },
    )
    lora_targets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Module names that get LoRA adapters. Default: every linear layer but the LM head (on Phi-3 "
            "the tutorial's o_proj qkv_proj gate_up_proj down_proj)."
        },
    )

    # --- optimisation ---------------------------------------------------------------------------
    optim: Literal["paged_adamw_8bit", "adamw_8bit", "adamw"] = field(
        default="paged_adamw_8bit",
        metadata={"help": "bitsandbytes paged 8-bit AdamW, 8-bit AdamW, or torch AdamW."},
    )
    batch_size: int = field(default=16, metadata={"help": "Rows per micro-batch (per process)."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    auto_batch_size: bool = field(
        default=True, metadata={"help": "On out-of-memory, retry with batch_size * 0.9 (accelerate)."}
    )
    epochs: int = field(default=10, metadata={"help": "Passes over the training rows."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: run all epochs)."})
    lr: float = field(default=3e-4, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (the Trainer's default, 0)."})
    warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps of linear warm-up before the linear decay to 0."}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this (0: no clipping)."}
    )
    seed: int = field(default=42, metadata={"help": "Seeds data order, held-out split, random init and adapter init."})

    # --- logging and outputs --------------------------------------------------------------------
    logging_steps: int = field(
        default=10, metadata={"help": "Optimizer steps between log lines (each is a host sync)."}
    )
    save_steps: int = field(default=0, metadata={"help": "Optimizer steps between resumable checkpoints (0: none)."})
    save_total_limit: int = field(default=0, metadata={"help": "Keep only the newest N checkpoints (0: keep all)."})
    resume: str | None = field(default=None, metadata={"help": "Checkpoint folder to continue from."})
    output_dir: str = field(default="out", metadata={"help": "Where the adapter, logs and checkpoints go."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace the run already in output_dir (its adapter, checkpoints and metrics); never files "
            "that no run wrote."
        },
    )
    report_to: Literal["none", "tensorboard"] = field(
        default="none", metadata={"help": "Also log through Accelerate's tracker."}
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={"help": "Hub repo id to upload the adapter to (token from HF_TOKEN or huggingface-cli login)."},
    )
    samples: bool = field(default=True, metadata={"help": "Translate a few held-out sentences at the end."})
    debug: bool = field(default=False, metadata={"help": "Show full tracebacks."})

    # --- filled in by the run, not options (init=False: the command line does not offer them) ---
    # What identifies the tokenizer and the data a run trained on, so that a resume, or evaluate's
    # held-out split, notices another tokenizer or a changed file behind the same path.
    tokenizer_sha256: str | None = field(default=None, init=False)
    data_sha256: str | None = field(default=None, init=False)
    base_model_id: str | None = field(default=None, init=False)  # what the base weights were (identity.py)

    def __post_init__(self):
        # Types first, for every field, whatever filled it: the command line's parser checks types,
        # but a YAML file or a run_config.json gives values as they are (`max_steps: 2.5`, `lr: [1, 2]`).
        # (The annotations, not dataclasses.fields(): HfArgumentParser rewrites a field's `str | None` to `str`.)
        for name, kind in typing.get_type_hints(Config).items():
            setattr(self, name, _checked(name, getattr(self, name), kind))
        # `~/x` as the shell expands it unquoted (--dataset and --tokenizer are expanded where they are read).
        self.output_dir = os.path.expanduser(self.output_dir)
        self.resume = None if self.resume is None else os.path.expanduser(self.resume)
        checks = [
            (
                self.resume is None or bool(self.resume.strip()),
                "--resume is empty (an unset variable?); name an OUTPUT_DIR/checkpoint-N folder, or leave --resume out",
            ),
            (self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (
                self.max_steps == -1 or self.max_steps >= 1,
                f"--max-steps must be -1 or at least 1, got {self.max_steps}",
            ),
            (0.0 <= self.eval_fraction < 1.0, f"--eval-fraction must be in [0, 1), got {self.eval_fraction}"),
            # Above 1, AdamW moves each weight by more than its own size a step: nothing trains, and
            # far above it bitsandbytes' 8-bit optimizer overflows (a traceback, not the NaN check).
            (0 < self.lr <= 1, f"--lr must be in (0, 1] (AdamW moves each weight by about lr a step), got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}"),
            # A negative clip norm scales every gradient by a negative factor: the run trains backwards.
            (self.max_grad_norm >= 0, f"--max-grad-norm must be 0 (no clipping) or more, got {self.max_grad_norm}"),
            (self.lora_r >= 1, f"--lora-r must be at least 1, got {self.lora_r}"),
            (self.lora_alpha >= 1, f"--lora-alpha must be at least 1, got {self.lora_alpha}"),
            (0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (
                0.0 <= self.compile_memory_budget <= 1.0,
                f"--compile-memory-budget must be in [0, 1], got {self.compile_memory_budget}",
            ),
            (self.loss_chunk >= 1, f"--loss-chunk must be at least 1 position, got {self.loss_chunk}"),
            (self.mlp_chunk >= 0, f"--mlp-chunk must be 0 (no chunks) or more tokens, got {self.mlp_chunk}"),
            (self.logging_steps >= 1, f"--logging-steps must be at least 1, got {self.logging_steps}"),
            (self.save_steps >= 0, f"--save-steps must be 0 or more, got {self.save_steps}"),
            (
                self.save_total_limit >= 0,
                f"--save-total-limit must be 0 (keep all) or more, got {self.save_total_limit}",
            ),
            (self.warmup_steps >= 0, f"--warmup-steps must be 0 or more, got {self.warmup_steps}"),
            (
                self.uncheckpointed_layers >= 0,
                f"--uncheckpointed-layers must be 0 or more, got {self.uncheckpointed_layers}",
            ),
            (
                self.gradient_checkpointing or self.uncheckpointed_layers == 0,
                "--uncheckpointed-layers leaves some layers out of gradient checkpointing, which is off; "
                "drop --no-gradient-checkpointing or --uncheckpointed-layers",
            ),
            (
                self.system_prompt is None or bool(self.system_prompt.strip()),
                "--system-prompt must not be empty; leave it out for no system message",
            ),
            # numpy's seed, which set_seed also sets, takes 0 to 2**32 - 1.
            (0 <= self.seed < 2**32, f"--seed must be in [0, 2**32), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise YodaError(message)

    @property
    def tokenizer_source(self) -> str:
        return self.tokenizer or self.model

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def changes(self) -> dict:
        """The options whose values differ from the defaults (a preset's among them), in field order."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and getattr(self, f.name) != (f.default_factory() if callable(f.default_factory) else f.default)
        }

    def changes_line(self) -> str:
        """`changes()` as the options a run prints at start, e.g. `--preset tiny --epochs 30 ...`
        ("the defaults" when none differ)."""
        shown = []
        for name, value in self.changes().items():
            option = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                shown.append(option if value else f"--no-{option[2:]}")
            else:
                shown.append(f"{option} {' '.join(value) if isinstance(value, list) else value}")
        return " ".join(shown) or "the defaults"

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """A Config from a saved run_config.json's values (keys unknown here, e.g. from a newer
        yoda_raw, are dropped); checked like any other."""
        options = {f.name for f in dataclasses.fields(cls) if f.init}
        cfg = cls(**{key: value for key, value in values.items() if key in options})
        cfg.tokenizer_sha256, cfg.data_sha256 = values.get("tokenizer_sha256"), values.get("data_sha256")
        cfg.base_model_id = values.get("base_model_id")
        return cfg


def read_json(path: Path, fix: str) -> dict:
    """The JSON object saved in `path` (run_config.json, trainer_state.json). Any damage (missing,
    unreadable, empty, not JSON, not an object) is one YodaError line that ends with `fix`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise YodaError(f"{path} is missing; {fix}") from None
    except OSError as err:
        raise YodaError(f"cannot read {path} ({err.strerror}); {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise YodaError(f"{path} is damaged (not JSON); {fix}") from None
    if not isinstance(value, dict):
        raise YodaError(f"{path} is damaged (not a JSON object); {fix}")
    return value


def _checked(name: str, value, kind):
    """`value` if it is of the field's type `kind` (an int where a float is expected becomes a float),
    else YodaError naming the option as the command line spells it.

    >>> _checked("lr", 1, float), _checked("tokenizer", None, str | None)
    (1.0, None)
    >>> _checked("cuda_graph", True, Literal["auto", "on", "off"])
    'on'
    """
    option = "--" + name.replace("_", "-")
    if isinstance(kind, types.UnionType):  # `str | None`: None, or the other type
        return (
            None
            if value is None
            else _checked(name, value, next(k for k in typing.get_args(kind) if k is not type(None)))
        )
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            value = "on" if value else "off"  # YAML reads an unquoted `on` or `off` as true or false
        if value not in choices:
            raise YodaError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if typing.get_origin(kind) is list:
        # A lone name in YAML (`lora_targets: o_proj`) would otherwise be taken as its letters.
        # An empty list is the default (--lora-targets: every linear layer but the head, model.py).
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise YodaError(f"{option} must be a list of names (in YAML: [o_proj, qkv_proj]), got {value!r}")
        return value
    # bool is a subclass of int in Python: `epochs: true` must not pass as 1.
    if kind is bool and not isinstance(value, bool):
        raise YodaError(f"{option} must be true or false, got {value!r}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise YodaError(f"{option} must be a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise YodaError(f"{option} must be a finite number, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise YodaError(f"{option} must be text, got {value!r}")
    return value


# What each preset changes; preset_defaults() fills in the smol model's location.
#
# smol: SmolLM2-135M-Instruct, a real pretrained instruct model 28x smaller than Phi-3-mini, trained
# on the tutorial's data. One epoch at lr 2e-3 teaches it Yoda speak in one CPU sitting
# (benchmarks/results/cpu_smol/ has the figures); the tutorial's 3e-4 learns only partly in one epoch. LoRA goes
# on every attention and MLP projection (the default targets). On a CPU: unquantized and fp32 (4-bit
# and bf16 are no faster there at this size); on a GPU: NF4 and bf16, as the tutorial. Its chat
# template injects a 21-token default system prompt ("You are a helpful AI assistant named
# SmolLM...") into every conversation without one: 38% of all tokens on the yoda set. A short
# system prompt that names the task replaces it, in training and generation alike.
#
# tiny: runs anywhere in a minute or two: a tiny Phi-3-architecture model and tokenizer built
# in-process (yoda_raw/tiny.py) and ~50 pairs shipped with the package. The learning rate is higher
# and there is no dropout so that its loss falls clearly in few steps.
SMOL_SYSTEM_PROMPT = "Translate into Yoda speak."
PRESETS: dict[str, dict] = {
    "tutorial": {},
    "smol": {
        "quant": "auto",
        "epochs": 1,
        "lr": 2e-3,
        "system_prompt": SMOL_SYSTEM_PROMPT,
        "logging_steps": 5,
        "output_dir": "out-smol",
    },
    "tiny": {
        "model": TINY,
        "dataset": TINY_DATASET,
        "init": "random",
        "epochs": 30,
        "batch_size": 8,
        "lr": 1e-2,
        "lora_dropout": 0.0,
        "logging_steps": 5,
        "eval_fraction": 0.1,
        "output_dir": "out-tiny",
    },
}


def preset_defaults(name: str) -> dict:
    """The option values `--preset name` sets. The smol model is the folder `python -m yoda_raw.fetch
    smol` wrote, when there is one (looked up now, not at import), else its Hub id."""
    from yoda_raw.fetch import model_source

    if name not in PRESETS:
        raise YodaError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    values = {"preset": name, **PRESETS[name]}
    if name == "smol":
        values["model"] = model_source("smol")
    return values


# --- the command line ---------------------------------------------------------------------------


class Parser(HfArgumentParser):
    """HfArgumentParser whose errors (unknown option, bad value) are one line, not usage + error."""

    def error(self, message: str):
        raise YodaError(f"{message}; see `{self.prog} --help`")


def parse_config(argv: list[str], prog: str = "python run.py", description: str | None = None) -> Config:
    """Command line -> Config. Precedence: command line > --config file > --preset > defaults."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="tutorial")
    first.add_argument("--config", default=None)
    known, rest = first.parse_known_args(argv)
    defaults = preset_defaults(known.preset)
    if known.config:
        defaults |= _read_yaml(known.config)
    parser = Parser(Config, prog=prog, description=description)
    parser.add_argument("--config", default=None, help="YAML file of options (keys are field names).")
    known_fields = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known_fields)
    if unknown:
        raise YodaError(f"{known.config}: unknown option(s) {', '.join(unknown)}; see `{prog} --help`")
    parser.set_defaults(**defaults)
    namespace = parser.parse_args(argv)
    del namespace.config
    return Config(**vars(namespace))


def _read_yaml(path: str) -> dict:
    # Not a regular file (a FIFO, a device, a folder): opening a FIFO would wait for a writer forever.
    if Path(path).exists() and not Path(path).is_file():
        raise YodaError(f"--config {path}: not a regular file; pass a YAML file of options")
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except OSError as err:
        raise YodaError(f"--config {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise YodaError(f"--config {path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise YodaError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise YodaError(f"--config {path}: expected a mapping of option: value, got {type(values).__name__}")
    return {key.replace("-", "_"): value for key, value in values.items()}
