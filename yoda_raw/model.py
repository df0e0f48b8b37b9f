"""The model: a causal LM, quantized to 4-bit NF4, frozen, with LoRA adapters on top.

QLoRA in four moves, in the order `build_model` makes them:
1. load the base with `BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)`: every linear
   layer except the LM head becomes a `bnb.nn.Linear4bit` holding 4-bit weights (0.5 byte each);
2. freeze it: only the adapters will learn;
3. gradient checkpointing (use_reentrant=False): keep only each layer's input in forward and
   recompute the rest in backward, trading ~1/3 more compute for far less activation memory
   (`--uncheckpointed-layers N` leaves the last N layers out, where memory allows);
4. LoRA (peft): next to each target linear W, a trainable B @ A of rank r; the output becomes
   W x + (alpha / r) * B A x. B starts at zero, so training starts from the base model exactly.

What stays in fp32? `prepare_model_for_kbit_training`, which the tutorial calls, upcasts every
non-quantized parameter (norms, embeddings, LM head) to fp32: about 0.4 GB more on Phi-3-mini.
They are all frozen, and under bf16 autocast their matmuls run in bf16 anyway, so we keep them in
the compute dtype; only the LoRA weights are fp32 (peft does that: the optimizer must update in full
precision). `--fp32-frozen` restores the tutorial's upcast; benchmarks/ measures both.
"""

import contextlib
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from accelerate import PartialState, init_empty_weights
from accelerate.utils import broadcast_object_list
from peft import LoraConfig, get_peft_model
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from yoda_raw import tiny
from yoda_raw.config import TINY, Config
from yoda_raw.errors import YodaError
from yoda_raw.errors import reason as error_reason
from yoda_raw.fetch import offline_hint
from yoda_raw.precision import Precision
from yoda_raw.sources import looks_like_local_path


def quantization_config(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """The tutorial's 4-bit recipe: NF4 weights, and their scales quantized too (double quant)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 4-bit levels placed at the quantiles of a normal distribution
        bnb_4bit_use_double_quant=True,  # 8-bit scales per 64-weight block: ~0.4 bit/weight saved
        bnb_4bit_compute_dtype=compute_dtype,  # weights are dequantized to this for each matmul
    )


def load_model_config(cfg: Config, vocab_size: int) -> transformers.PretrainedConfig:
    """The architecture: read from the model folder or Hub id, or the tiny built-in one."""
    if cfg.model == TINY:
        return tiny.model_config(vocab_size)
    try:
        return AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:
        raise YodaError(_not_found(cfg.model, "model", err)) from None


def resolve_quant(quant: str, device: torch.device) -> str:
    """`--quant auto`: 4-bit NF4 on a CUDA GPU; unquantized elsewhere, where bitsandbytes' 4-bit
    layers save memory a small model does not need and cost time.

    >>> resolve_quant("auto", torch.device("cpu")), resolve_quant("nf4", torch.device("cpu"))
    ('none', 'nf4')
    """
    if quant != "auto":
        return quant
    return "nf4" if torch.device(device).type == "cuda" else "none"


def skeleton(model_config: transformers.PretrainedConfig, trust_remote_code: bool = False):
    """The model's modules on the meta device, with no memory behind their weights: built from the
    config in a fraction of a second, so layer names can be checked before loading the weights
    (which takes seconds to minutes)."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)


def linear_layer_names(model) -> list[str]:
    """Names of the linear layers except the LM head, each once, in the order the model holds them:
    the default LoRA targets. Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj (the tutorial's
    four); Llama and SmolLM2: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    (A 4-bit bnb.nn.Linear4bit is an nn.Linear too.)"""
    head = model.get_output_embeddings()
    names = [n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head]
    return list(dict.fromkeys(names))


def choose_lora_targets(requested: list[str], model, model_name: str) -> list[str]:
    """The modules LoRA wraps: `requested`, each checked to name a module of `model` (a skeleton
    will do), or every linear layer but the head when nothing is requested."""
    if not requested:
        return linear_layer_names(model)
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [name for name in requested if name not in names]
    if missing:
        raise YodaError(
            f"--lora-targets {' '.join(missing)}: no such module in {model_name}; "
            f"its linear layers are named {' '.join(linear_layer_names(model))} "
            "(leave --lora-targets out to adapt them all)"
        )
    return list(requested)


def load_base_model(cfg: Config, precision: Precision, device: torch.device, vocab_size: int):
    """Load (or build, with --init random) the base model on `device`, 4-bit unless --quant none
    (or auto, off a GPU)."""
    compute_dtype = torch.float32 if cfg.quant_compute_dtype == "float32" else precision.dtype
    quant = quantization_config(compute_dtype) if resolve_quant(cfg.quant, device) == "nf4" else None
    # Non-quantized weights (norms, embeddings, head, or everything with --quant none) in the
    # compute dtype; fp32 when asked, or when computing in fp32.
    dtype = torch.float32 if cfg.fp32_frozen else precision.dtype
    checkpoint = (
        _random_checkpoint(cfg, vocab_size, dtype) if cfg.init == "random" else contextlib.nullcontext(cfg.model)
    )
    with checkpoint as source:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                quantization_config=quant,
                dtype=dtype,
                device_map={"": device},  # the whole model on this process's device
                trust_remote_code=cfg.trust_remote_code,
            )
        except OSError as err:
            raise YodaError(_not_found(cfg.model, "model", err)) from None
    if cfg.fp32_frozen:
        # Cost: 2 bytes more per frozen weight. On Phi-3-mini the embeddings and LM head are
        # 2 x 32064 x 3072 = 197M weights, so 394 MB more than in bf16 (the 65 norms add 0.4 MB).
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    model.config.use_cache = False  # the KV cache only helps generation; in training it costs memory
    _keep_cpu_4bit_gradients(model)
    return model


def random_model(config: transformers.PretrainedConfig, seed: int, dtype: torch.dtype, trust_remote_code=False):
    """The architecture of `config` with random weights: what profiling needs when no weights can be
    downloaded. Built on a GPU when there is one (3.8B weights in seconds, not minutes), so the same
    seed gives other weights on a CPU-only machine."""
    transformers.set_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    # Random init zeroes the embedding row of the padding token, which for Phi-3 is <|endoftext|>,
    # a token in every conversation. A row that starts with it then keeps an exactly-zero hidden
    # state through every layer, and each RMSNorm's backward scales its gradient by 1/sqrt(eps)
    # (316x): past ~15 layers it overflows to NaN. Trained checkpoints have a real vector there,
    # so give that row the same random init as the others.
    embeddings = model.get_input_embeddings()
    if embeddings.padding_idx is not None:
        with torch.no_grad():
            embeddings.weight[embeddings.padding_idx].normal_(0.0, config.initializer_range)
    return model


@contextlib.contextmanager
def _random_checkpoint(cfg: Config, vocab_size: int, dtype: torch.dtype):
    """Random weights, written to a temporary folder so that the very same `from_pretrained` call
    loads and quantizes them as it would real weights (speed and memory are the real model's)."""
    # On several processes the main one writes the folder and the others wait for its name (under a
    # process group transformers' save_pretrained writes on rank 0 only anyway).
    state = PartialState()
    folder = [None]
    try:  # the folder goes however this ends: a full disk, Ctrl-C or SIGTERM while writing (cli.py) included
        if state.is_main_process:
            folder = [tempfile.mkdtemp(prefix="yoda_raw_random_")]
            model = random_model(load_model_config(cfg, vocab_size), cfg.seed, dtype, cfg.trust_remote_code)
            try:
                model.save_pretrained(folder[0])
            except (OSError, RuntimeError, SafetensorError) as err:
                reason = error_reason(err)
                raise YodaError(
                    f"--init random: cannot write the random weights to {tempfile.gettempdir()} ({reason}); "
                    "free some space there, or point TMPDIR to a folder with room"
                ) from None
            del model
        broadcast_object_list(folder)
        yield folder[0]
    finally:
        if folder[0] is not None:
            state.wait_for_everyone()  # every process has loaded it
        if state.is_main_process and folder[0] is not None:
            shutil.rmtree(folder[0], ignore_errors=True)


def _keep_cpu_4bit_gradients(model) -> None:
    """bitsandbytes on CPUs with AVX512-BF16 repacks 4-bit weights in place during the first
    eval-mode forward, after which no gradient flows through the 4-bit layers (measured with
    bitsandbytes 0.50.2: LoRA gradients ~76% wrong, and the only sign is a UserWarning that
    `gemv_4bit` has no autograd kernel). Turning that path off on every 4-bit layer keeps training correct after an
    evaluation or a generation. GPUs never take that path."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers, in order: the blocks gradient checkpointing works on."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def final_norm(model) -> torch.nn.Module | None:
    """The norm the last decoder layer's output goes through (transformers' `norm` beside `layers`
    in Llama, Mistral, Qwen2, Phi-3), or None. `model` may be wrapped (peft, DDP)."""
    for module in model.modules():
        layers, norm = getattr(module, "layers", None), getattr(module, "norm", None)
        if isinstance(layers, torch.nn.ModuleList) and isinstance(norm, torch.nn.Module):
            return norm
    return None


def check_uncheckpointed_layers(cfg: Config, skeleton_model) -> None:
    """--uncheckpointed-layers against the model's layer count, before any weights load."""
    count = len(decoder_layers(skeleton_model))
    if cfg.uncheckpointed_layers > count:
        raise YodaError(
            f"--uncheckpointed-layers {cfg.uncheckpointed_layers} is more than the model's {count} decoder layers; "
            f"use at most {count} (or --no-gradient-checkpointing)"
        )


def add_lora(model, cfg: Config):
    """Freeze the base, turn on gradient checkpointing, and wrap target linears with LoRA
    (--lora-targets, or every linear layer but the head)."""
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.gradient_checkpointing:
        # use_reentrant=False: the checkpointed blocks get gradients even though their inputs
        # (frozen embeddings) do not require grad, so no enable_input_require_grads() hack is needed.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.uncheckpointed_layers:
            # The last layers: their backward comes first, so their kept activations are freed first.
            layers = decoder_layers(model)
            for layer in layers[len(layers) - cfg.uncheckpointed_layers :]:
                layer.gradient_checkpointing = False
    targets = choose_lora_targets(cfg.lora_targets, model, cfg.model)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias="none",
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    # Seed right before the adapters are created: the same --seed then gives the same initial
    # LoRA A matrices as `transformers.set_seed(seed); peft.get_peft_model(model, config)`,
    # however much randomness loading the model used.
    transformers.set_seed(cfg.seed)
    model = get_peft_model(model, lora)
    if cfg.init == "pretrained":
        # Name the base by its source (with a local folder peft would record the same path anyway).
        model.peft_config["default"].base_model_name_or_path = cfg.model
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) as peft counts them: a 4-bit weight counts as its unquantized size."""
    return model.get_nb_trainable_parameters()


def parameter_line(model) -> str:
    """The line the tutorial prints, e.g. '12.58M trainable of 3833.66M parameters (0.33%)'."""
    trainable, total = parameter_counts(model)
    return f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.2f}M parameters ({100 * trainable / total:.2f}%)"


def _not_found(source: str, what: str, err: Exception) -> str:
    if Path(source).expanduser().exists() or looks_like_local_path(source):
        return f"{what} not found at {source}: pass a folder with config.json and weights (--{what} PATH)"
    return (
        f"cannot load {what} {source!r} from the Hugging Face Hub ({type(err).__name__}); "
        f"without network access, download it elsewhere and pass the local folder with --{what} PATH"
        f"{offline_hint(source)}"
    )
