"""One optimizer step, stage by stage: what the data and the model become, and which function does it.

    python -m yoda_raw.trace                                   # the tiny preset: a CPU, a few seconds
    python -m yoda_raw.trace --lora-r 4 --batch-size 2 --grad-accum 2 --optim adamw
    python -m yoda_raw.trace --preset tutorial                 # Phi-3-mini in 4 bits (a CUDA GPU)

It takes every option run.py takes (config.parse_config), with `--preset tiny` unless told
otherwise, and runs that very run, `train.main`, for one optimizer step, watching it through the
loop's hooks (yoda_raw/hooks.py): it computes nothing itself. At each stage it prints what came out:
one conversation as ids and labels, the packed rows, one layer's 4-bit weights and its LoRA
matrices, the optimizer, the batch, the logits and the loss, the gradients, the clipped update and
the optimizer state, and on CUDA the memory allocated after each stage. So the loss and gradient
norm it prints are those that `python run.py` with the same options logs for step 1, and a change
to the loop shows here without a change to this file. What the run writes goes to a temporary
folder, removed at the end.
"""

import dataclasses
import math
import sys
import tempfile
import textwrap

import torch

from yoda_raw import meter
from yoda_raw.chat import IGNORE, tokenize_conversation
from yoda_raw.cli import run_command
from yoda_raw.config import Config, parse_config
from yoda_raw.errors import YodaError
from yoda_raw.hooks import Observer
from yoda_raw.inspect import row_as_text
from yoda_raw.loss import supervised_count
from yoda_raw.packing import EpochSampler, count_tokens
from yoda_raw.train import main as train

PEFT_PREFIX = "base_model.model."  # peft's wrapper puts this before every name of the base model


def trace(cfg: Config) -> dict:
    """Run the first optimizer step of the run `cfg` describes, printing each stage; returns the
    step's logged record (loss, grad_norm, lr, ...)."""
    print(f"yoda_raw.trace: the first optimizer step of `python run.py --preset {cfg.preset} ...`, stage by stage")
    tracer = Tracer()
    with tempfile.TemporaryDirectory(prefix="yoda_raw_trace_") as folder:
        one_step = dataclasses.replace(
            cfg, max_steps=1, logging_steps=1, save_steps=0, samples=False, output_dir=folder, overwrite=True,
            resume=None, report_to="none", push_to_hub=None,
        )  # fmt: skip
        train(one_step, observer=tracer)
    record = tracer.record
    print(
        f"\nstep 1: loss {record['loss']:.6f}, grad_norm {record['grad_norm']:.6f}, lr {record['lr']:g}: "
        "what `python run.py` with these options logs for step 1 (--logging-steps 1)"
    )
    return record


class Tracer(Observer):
    """Prints each stage of the run as the loop's hooks report it (yoda_raw/hooks.py)."""

    def settled(self, cfg, precision, plan, accelerator) -> None:
        if accelerator.num_processes > 1:
            raise YodaError("the trace follows one process: run it as `python -m yoda_raw.trace`, not on several")
        self.cfg, self.device = cfg, accelerator.device
        heading(1, "setup", "config.parse_config, settle.settle, train.make_accelerator")
        print(f"model {cfg.model} (--init {cfg.init}, --quant {cfg.quant}), dataset {cfg.dataset}")
        self.autocast = (
            "no autocast" if precision.mixed_precision == "no" else f"the forward under {precision.dtype} autocast"
        )
        print(
            f"device {self.device}; precision.choose_precision -> {precision.name}: {self.autocast}; by default also "
            "the dtype of the 4-bit matmuls and of the frozen weights (stage 4 reads both off the model)"
        )
        print(f"fast.settle -> {plan}")
        memory(self.device)

    def data(self, tokenizer, conversations, train_conversations, held_out, rows) -> None:
        cfg = self.cfg
        heading(2, "one conversation -> ids and labels", "data.load_conversations, chat.tokenize_conversation")
        print(
            f"{len(conversations)} conversations; data.split_conversations holds {len(held_out)} out "
            f"(--eval-fraction {cfg.eval_fraction}), {len(train_conversations)} are for training. The first of those:"
        )
        messages = train_conversations[0]
        for message in messages:
            print(f"  {message['role']:>9}: {message['content']}")
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        print(f"the tokenizer's chat template renders it as (chat.render):\n  {text!r}")
        show_ids_and_labels(tokenizer, tokenize_conversation(tokenizer, messages, cfg.train_on), cfg.train_on)
        memory(self.device)

        heading(3, "rows, and the order they come in", "packing.build_rows, packing.EpochSampler")
        sampler = EpochSampler(len(rows), cfg.shuffle, cfg.seed)
        sampler.set_epoch(0)
        self.order = list(sampler)  # the row order of epoch 0: what the loader will draw
        show_rows(tokenizer, rows, self.order, cfg)
        memory(self.device)

    def base_model(self, model) -> None:
        weights = "its weights in 4 bits" if self.cfg.quant == "nf4" else "not quantized"
        heading(4, f"the base model, {weights}", "model.load_base_model")
        self.name, layer = largest_target(model, self.cfg.lora_targets)
        show_base(model)
        show_4bit(self.name, layer)
        memory(self.device)

    def adapted(self, model) -> None:
        heading(5, "LoRA on the frozen base", "model.add_lora, fast.apply")
        self.model = model  # the LoRA model itself: names and hooks below use it, not what prepare wraps
        show_lora(self.name, model.get_submodule(PEFT_PREFIX + self.name), self.cfg)
        memory(self.device)

    def loop_start(self, model, optimizer, loader, steps_per_epoch: int, total_steps: int) -> None:
        heading(6, "the optimizer", "optim.build_optimizer, fast.optimizer, accelerator.prepare")
        show_optimizer(optimizer, self.cfg)
        print(
            f"accelerator.prepare: the model's forward gets {self.autocast}, batches come on {self.device}, "
            f"the optimizer is wrapped (for fp16 loss scaling); an epoch is {steps_per_epoch} steps"
        )
        # A hook on the model reads the shape of what its forward returns (the logits; with
        # --chunked-loss the last hidden states) as they pass; it changes nothing.
        self.outputs_seen = []
        self.model.get_base_model().register_forward_hook(
            lambda module, args, output: self.outputs_seen.append((tuple(output.logits.shape), output.logits.dtype))
        )
        memory(self.device)

    def micro_batches(self, step: int, micro_batches: list[dict], n_supervised) -> None:
        heading(7, "the micro-batches of step 1", "train.step_batches, packing.Collator, loss.supervised_count")
        show_batches(micro_batches, self.order, self.cfg)
        self.n_supervised = int(n_supervised)
        print(f"the step's loss will be divided by its {self.n_supervised} supervised tokens (all micro-batches)")
        memory(self.device)

    def backward_done(self, step: int, step_loss, step_fn) -> None:
        kind = type(step_fn)
        heading(8, "forward and backward", f"{kind.__module__.removeprefix('yoda_raw.')}.{kind.__qualname__}")
        self.step_fn = step_fn
        print(f"{kind.__name__}: {first_line(kind.__doc__)}")
        loss_sum = step_loss.item()
        vocab = self.model.get_output_embeddings().out_features
        show_loss(
            self.outputs_seen, vocab, loss_sum, self.n_supervised, loss_sum / self.n_supervised, self.cfg.loss_chunk
        )
        show_gradients(self.model, self.name)
        memory(self.device)

    def before_update(self, step: int, grad_norm, optimizer) -> None:
        heading(9, "clip and update", "accelerator.clip_grad_norm_, optimizer.step, optimizer.zero_grad")
        show_clipping(grad_norm.item(), self.cfg.max_grad_norm)
        layer = self.model.get_submodule(PEFT_PREFIX + self.name)
        self.before = {part: getattr(layer, part).default.weight.detach().clone() for part in ("lora_A", "lora_B")}

    def updated(self, step: int, lr: float, optimizer) -> None:
        print(f"optim.learning_rate of step 1: {lr:g} (--lr {self.cfg.lr:g}, --warmup-steps {self.cfg.warmup_steps})")
        show_optimizer_state(self.model, optimizer, self.name)
        layer = self.model.get_submodule(PEFT_PREFIX + self.name)
        for part, old in self.before.items():
            change = (getattr(layer, part).default.weight.detach() - old).abs().max().item()
            print(f"{self.name}.{part} moved by at most {change:.6g}")
        print(f"(Adam's first step moves a weight by about the learning rate, {lr:g}, unless its gradient is zero)")
        if self.step_fn.frees_gradients:
            print("optimizer.zero_grad(set_to_none=True): the gradients are freed before the next step")
        else:
            print("optimizer.zero_grad(set_to_none=False): zeroed in place, where the CUDA graph adds the next ones")
        memory(self.device)

    def logged(self, record: dict) -> None:
        self.record = record


def first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


# --- printing the stages ---------------------------------------------------------------------------


def heading(number: int, title: str, functions: str) -> None:
    print(f"\n== {number}. {title}  [{functions}] ==")


def memory(device: torch.device) -> None:
    """On CUDA, what torch holds now and at most so far. Nothing on a CPU, where torch keeps no count."""
    if device.type == "cuda":
        allocated, peak = torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
        print(f"[cuda: {allocated / meter.GIB:.3f} GiB allocated, peak so far {peak / meter.GIB:.3f} GiB]")


def show_ids_and_labels(tokenizer, example: dict, train_on: str) -> None:
    ids, labels = example["input_ids"], example["labels"]
    n_supervised = sum(label != IGNORE for label in labels)
    print(
        f"chat.tokenize_conversation (--train-on {train_on}): {len(ids)} ids, {n_supervised} supervised; "
        "label -100 masks a position (no loss)."
    )
    print("labels[t] is the token at t; the model shifts them, so position t - 1 learns to predict it.")
    print(f"  {'pos':>4} {'id':>6}  {'token':<22} label")
    for pos, (token_id, label, token) in enumerate(zip(ids, labels, tokenizer.convert_ids_to_tokens(ids), strict=True)):
        print(f"  {pos:>4} {token_id:>6}  {token!r:<22} {'-100 (masked)' if label == IGNORE else label}")


def show_rows(tokenizer, rows: list[dict], order: list[int], cfg: Config) -> None:
    totals = count_tokens(rows)
    shuffled = ", shuffled (seeded)," if cfg.shuffle else ""
    if cfg.packing == "wrapped":
        print(
            f"the training conversations{shuffled} are tokenized, joined into one stream of {totals['tokens']:,} "
            f"tokens ({totals['supervised_tokens']:,} supervised) and cut every {cfg.max_length} "
            f"(--packing wrapped): {len(rows)} rows. A row starts wherever a cut falls, often mid-conversation."
        )
    else:
        print(
            f"one row per conversation{shuffled} cut to {cfg.max_length} tokens (--packing none): {len(rows)} rows, "
            f"{totals['tokens']:,} tokens, {totals['supervised_tokens']:,} supervised"
        )
    print(f"packing.EpochSampler's order for epoch 0 (--shuffle {cfg.shuffle}): rows {preview(order, 12)}")
    row = rows[order[0]]
    n_supervised = sum(label != IGNORE for label in row["labels"])
    print(f"row {order[0]}, the first the loader draws: {len(row['input_ids'])} tokens, {n_supervised} supervised")
    print(f"  input_ids {preview(row['input_ids'], 16)}")
    print(f"  labels    {preview(row['labels'], 16)}")
    print("  as text, supervised tokens [[in double brackets]] (yoda_raw.inspect.row_as_text):")
    print(
        textwrap.fill(row_as_text(tokenizer, row, colour=False), width=100, initial_indent="  ", subsequent_indent="  ")
    )


def largest_target(model, targets: list[str]) -> tuple[str, torch.nn.Module]:
    """The largest linear layer LoRA will wrap (the first among equals): the one the trace follows."""
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if name.split(".")[-1] in targets and hasattr(module, "in_features")
    ]
    if not candidates:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise YodaError(
            f"--lora-targets {' '.join(targets)}: no such module; the linear layers are {', '.join(linear)}"
        )
    return max(candidates, key=lambda pair: pair[1].in_features * pair[1].out_features)


def show_base(model) -> None:
    """What the weights of the base model are stored as, by kind of tensor."""
    kinds = {}
    for param in model.parameters():
        kind = f"{type(param).__name__} {param.dtype}"
        count, size = kinds.get(kind, (0, 0))
        kinds[kind] = (count + 1, size + param.numel() * param.element_size())
    print(f"{type(model).__name__}, {model.config.num_hidden_layers} layers; its weights as stored:")
    for kind, (count, size) in kinds.items():
        print(f"  {count:>4} tensors {kind:<26} {size:>15,} bytes")
    if any(kind.startswith("Params4bit") for kind in kinds):
        print("  (Params4bit are the 4-bit linear layers; the embeddings, norms and LM head stay unquantized)")


def show_4bit(name: str, layer) -> None:
    """The layer's 4-bit weights, read off bitsandbytes' QuantState, and what dequantizing them gives."""
    weight, n = layer.weight, layer.in_features * layer.out_features
    print(f"the trace follows {name} (the largest layer LoRA will wrap): {layer.out_features} x {layer.in_features}")
    state = getattr(weight, "quant_state", None)
    if state is None:
        print(f"  weight {weight.dtype} {tuple(weight.shape)}: {weight.nbytes:,} bytes, not quantized (--quant none)")
        return
    import bitsandbytes.functional as bnb_functional

    print(f"  {type(layer).__module__}.{type(layer).__name__}, weight {n:,} values stored as:")
    storage = f"{type(weight).__name__} {weight.dtype} {tuple(weight.shape)}"
    print(f"    {storage}: {weight.nbytes:,} bytes, two 4-bit codes a byte")
    n_blocks = state.absmax.numel()
    print("  its quant_state (bitsandbytes' QuantState):")
    print(f"    quant_type {state.quant_type}: a 4-bit code picks one of {state.code.numel()} levels in [-1, 1],")
    print(f"      code = {preview([round(x, 4) for x in state.code.tolist()], 16)}")
    print(f"    blocksize  {state.blocksize}: each block of {state.blocksize} weights is scaled by its absmax")
    scales = state.absmax.nbytes
    if state.nested:  # double quantization: the scales are quantized too
        second = state.state2
        scales += second.absmax.nbytes + state.offset.nbytes
        print(
            f"    absmax     {state.absmax.dtype} {tuple(state.absmax.shape)}, {state.absmax.nbytes:,} bytes: double "
            f"quantization stores each block's absmax, minus offset {state.offset.item():.4f}, in 8 bits"
        )
        print(
            f"    state2     the 8-bit absmax's own scales: absmax {second.absmax.dtype} {tuple(second.absmax.shape)}, "
            f"one per {second.blocksize} blocks, and a code of {second.code.numel()} {second.code.dtype} levels"
        )
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        print(f"    absmax     {state.absmax.dtype} {tuple(state.absmax.shape)}, {state.absmax.nbytes:,} bytes")
        absmax = state.absmax
    print(f"    dtype      {state.dtype}: what the weights are dequantized to for each matmul")
    total = weight.nbytes + scales
    print(
        f"  {weight.nbytes:,} bytes of codes + {scales:,} of scales = {8 * total / n:.3f} bits a weight "
        f"(fp32 absmax would make it {8 * (weight.nbytes + 4 * n_blocks) / n:.3f}; bf16 weights 16, fp32 32)"
    )
    dequantized = bnb_functional.dequantize_4bit(weight.data, state)  # (out, in)
    print(f"  bitsandbytes.functional.dequantize_4bit -> {tuple(dequantized.shape)} {dequantized.dtype}:")
    print(f"    weight[0, :6] = {preview([round(x, 4) for x in dequantized[0, :6].tolist()], 6)}")
    byte = weight.data.flatten()[0].item()
    code = state.code[byte >> 4].item()
    print(
        f"    by hand: byte 0 is 0x{byte:02x}; its high 4 bits {byte >> 4} pick code[{byte >> 4}] = {code:.4f}, "
        f"times block 0's absmax {absmax[0].item():.4f} = {code * absmax[0].item():.4f} = weight[0, 0]"
    )
    block = dequantized.flatten()[: state.blocksize]
    print(f"    block 0 holds {block.unique().numel()} distinct values (at most {state.code.numel()}: one per level)")


def show_lora(name: str, lora_layer, cfg: Config) -> None:
    lora_a, lora_b = lora_layer.lora_A.default.weight, lora_layer.lora_B.default.weight
    scale = lora_layer.scaling["default"]
    checkpointing = "on" if cfg.gradient_checkpointing else "off"
    if cfg.gradient_checkpointing and cfg.uncheckpointed_layers:
        checkpointing += f", but for the last {cfg.uncheckpointed_layers} layers (--uncheckpointed-layers)"
    print(f"every parameter of the base frozen; gradient checkpointing {checkpointing}")
    print(
        f"{name} is now peft's {type(lora_layer).__module__}.{type(lora_layer).__name__}: "
        "y = base(x) + scale * B(A(dropout(x)))"
    )
    bound = 1 / math.sqrt(lora_a.shape[1])
    print(
        f"  A  lora_A.default.weight {tuple(lora_a.shape)} = (r, in), {lora_a.dtype}, values in "
        f"[{lora_a.min().item():.4f}, {lora_a.max().item():.4f}]: peft's Kaiming-uniform init, within "
        f"+-1/sqrt(in) = {bound:.4f}"
    )
    zero = "all zero, so B A = 0 and the model starts out as the base model" if not lora_b.any() else "not zero"
    print(f"  B  lora_B.default.weight {tuple(lora_b.shape)} = (out, r), {lora_b.dtype}, {zero}")
    print(f"  scale = lora_alpha / r = {cfg.lora_alpha} / {cfg.lora_r} = {scale:g}; dropout {cfg.lora_dropout} on x")
    print(f"  {lora_a.numel() + lora_b.numel():,} trainable values next to the layer's frozen ones")


def show_optimizer(optimizer, cfg: Config) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the real one
    group = optimizer.param_groups[0]
    n_tensors = sum(len(g["params"]) for g in optimizer.param_groups)
    kind = type(inner)
    name = f"{kind.__module__}.{kind.__name__}"
    if kind.__module__.startswith("yoda_raw"):  # our subclass: name what it is made from
        name += f" (a {kind.__mro__[1].__module__}.{kind.__mro__[1].__name__})"
    print(
        f"--optim {cfg.optim}: {name} over {n_tensors} trainable tensors, "
        f"betas {group['betas']}, eps {group['eps']:g}, weight decay {group['weight_decay']:g}"
    )
    if hasattr(inner, "args"):  # bitsandbytes
        print(
            f"  {inner.args.optim_bits}-bit state for tensors of {inner.args.min_8bit_size:,}+ elements, 32-bit for "
            f"smaller ones; paged (CUDA unified memory): {inner.is_paged}"
        )
    print("  its state is made at the first optimizer.step (stage 9)")


def show_batches(micro_batches: list[dict], order: list[int], cfg: Config) -> None:
    print(
        f"step 1 = {len(micro_batches)} micro-batch(es) (--grad-accum {cfg.grad_accum}) of up to {cfg.batch_size} "
        "rows (--batch-size), padded on the right by packing.Collator, moved to the device by Accelerate"
    )
    for i, batch in enumerate(micro_batches):
        drawn = order[i * cfg.batch_size : i * cfg.batch_size + len(batch["input_ids"])]
        print(f"micro-batch {i + 1}: rows {preview(drawn, 12)}")
        mask = batch["attention_mask"]
        notes = {
            "input_ids": "token ids",
            "attention_mask": f"{int(mask.sum())} tokens (1), {int((mask == 0).sum())} padding (0)",
            "labels": f"{int(supervised_count(batch))} supervised next-token targets; -100 elsewhere",
        }
        for key, note in notes.items():
            tensor = batch[key]
            print(f"  {key:<15} {str(tuple(tensor.shape)):<10} {str(tensor.dtype):<12} {tensor.device}  {note}")


def show_loss(outputs_seen: list, vocab: int, loss_sum: float, n_supervised: int, step_loss: float, chunk: int) -> None:
    for i, (shape, dtype) in enumerate(outputs_seen):
        batch, length, width = shape
        if width == vocab:
            print(f"micro-batch {i + 1}: the model's forward -> logits {shape} = (B, T, V) {dtype}")
            print(
                f"  loss.token_loss_sum: logits[:, :-1] as float32 {(batch, length - 1, vocab)} (a copy of "
                f"{batch * (length - 1) * vocab * 4 / 2**20:.1f} MiB) against labels[:, 1:] {(batch, length - 1)}"
            )
        else:
            print(
                f"micro-batch {i + 1}: the model's forward, its LM head set aside -> hidden states {shape} = (B, T, H)"
            )
            print(
                f"  loss.chunked_cross_entropy (--chunked-loss on): the head and cross-entropy over {chunk} "
                f"positions at a time (--loss-chunk), never all {batch * (length - 1)} positions' logits at once"
            )
    print(f"cross-entropy summed over the step's {n_supervised} supervised positions: {loss_sum:.4f}")
    print(
        f"loss of the step = {loss_sum:.4f} / {n_supervised} = {step_loss:.6f} "
        f"(a uniform guess over the {vocab} entries scores ln {vocab} = {math.log(vocab):.4f})"
    )
    print("backward of loss_sum / supervised tokens: the gradients accumulate in each trainable tensor's .grad")


def show_gradients(model, name: str) -> None:
    params = [(n.removeprefix(PEFT_PREFIX), p) for n, p in model.named_parameters()]
    trainable = [(n, p) for n, p in params if p.requires_grad]
    frozen = [(n, p) for n, p in params if not p.requires_grad]
    with_grad = sum(p.grad is not None for _, p in trainable)
    print(
        f"gradients: {with_grad} of the {len(trainable)} trainable tensors have one, "
        f"{sum(p.grad is not None for _, p in frozen)} of the {len(frozen)} frozen ones"
    )
    block = block_prefix(name)
    width = max(len(n) for n, _ in trainable)
    print(f"those of {block}* (names without peft's {PEFT_PREFIX!r}):")
    zero_a = False
    for n, p in trainable:
        if not n.startswith(block):
            continue
        norm = f"{p.grad.norm().item():.6g}" if p.grad is not None else "none"
        zero_a |= "lora_A" in n and norm == "0"
        print(f"  {n:<{width}}  {str(tuple(p.shape)):<10} grad norm {norm}")
    if zero_a:
        print(
            "(lora_A's gradient is 0 at step 1: lora_B is still 0, so nothing reaches lora_A before the first update)"
        )


def show_clipping(grad_norm: float, max_grad_norm: float) -> None:
    if max_grad_norm and grad_norm > max_grad_norm:
        print(
            f"global gradient norm {grad_norm:.6f} > --max-grad-norm {max_grad_norm:g}: every gradient is "
            f"scaled by {max_grad_norm / grad_norm:.6f}"
        )
    else:
        print(f"global gradient norm {grad_norm:.6f}, within --max-grad-norm {max_grad_norm:g}: nothing to clip")


def show_optimizer_state(model, optimizer, name: str) -> None:
    """Per parameter: the state tensors the optimizer made, their bits and bytes, paged or not."""
    trainable = [(n.removeprefix(PEFT_PREFIX), p) for n, p in model.named_parameters() if p.requires_grad]
    # Tensors several parameters point to (bitsandbytes' quantization maps) are counted once, apart.
    owners = {}
    for _, p in trainable:
        for value in optimizer.state[p].values():
            if torch.is_tensor(value):
                owners.setdefault(id(value), []).append(value)
    shared = {key: values[0] for key, values in owners.items() if len(values) > 1}

    block = block_prefix(name)
    width = max(len(n) for n, _ in trainable)
    print(f"optimizer state after optimizer.step, for {block}* (elements: the parameter's; bytes: its state's):")
    totals = {"8-bit": 0, "32-bit": 0, "paged": 0, "bytes": 0}
    for n, p in trainable:
        tensors = {k: v for k, v in optimizer.state[p].items() if torch.is_tensor(v) and id(v) not in shared}
        moments = [v for v in tensors.values() if v.numel() == p.numel()]  # Adam's two moments
        bits = f"{8 * moments[0].element_size()}-bit"
        paged = any(getattr(v, "is_paged", False) for v in tensors.values())
        size = sum(v.nbytes for v in tensors.values())
        totals[bits] = totals.get(bits, 0) + 1
        totals["paged"] += paged
        totals["bytes"] += size
        if n.startswith(block):
            layout = ", ".join(f"{k} {str(v.dtype).removeprefix('torch.')}{list(v.shape)}" for k, v in tensors.items())
            print(f"  {n:<{width}}  {p.numel():>9,}  {bits:<6} {size:>9,} B  {'paged' if paged else 'not paged'}")
            print(f"      {layout}")
    shared_bytes = sum(v.nbytes for v in shared.values())
    print(
        f"all {len(trainable)} trainable tensors: {totals['8-bit']} with 8-bit state, {totals['32-bit']} with 32-bit, "
        f"{totals['paged']} paged; {totals['bytes']:,} bytes of state"
        + (f" + {shared_bytes:,} shared by all ({len(shared)} quantization maps)" if shared else "")
    )


def block_prefix(name: str) -> str:
    """'model.layers.0.mlp.gate_up_proj' -> 'model.layers.0.': the decoder block a layer is in."""
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[: numbered[0] + 1]) + "." if numbered else name


def preview(values: list, limit: int) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def main(argv: list[str] | None = None) -> int:
    """`python -m yoda_raw.trace`: a mistake in the input is one line `error: ...`, status 2 (cli.py)."""
    return run_command(trace_command, argv)


def trace_command(argv: list[str]) -> int:
    # --preset tiny first, so that a --preset given on the command line wins.
    cfg = parse_config(
        ["--preset", "tiny", *argv], prog="python -m yoda_raw.trace", description=__doc__.splitlines()[0]
    )
    trace(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
