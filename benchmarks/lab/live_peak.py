"""How much do --split-layers and --mlp-chunk take off a step's peak, at the real model's widths,
on a CPU?

A step of a few decoder layers of the model's config (Phi-3-mini's by default: its widths, its
vocabulary), random weights, LoRA r=8 with dropout on every linear layer as the loop has it,
gradient checkpointing, the chunked loss; each configuration in turn. A dispatch mode counts the
bytes of the tensors the step makes that are still alive, and their most at once: what a GPU's
allocator would have to hold for them, without its rounding, its cache or the CUDA graph's pool.
Left out, as on a CPU: the 4-bit weights and their dequantized copies (the weights here are dense,
made before counting), offloading, and what a compiled layer keeps instead of what eager autograd
keeps. So the figures are the eager layers' share of the peak; a GPU measures the rest.

    python benchmarks/lab/live_peak.py --config ../shared/data/phi3-mini-4k-instruct/config.json \\
        --rows 16 --tokens 512 --layers 2 --runs whole,split,chunk:4096,chunk:2048
"""

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere: yoda_raw beside benchmarks/

MiB = 2**20


class LivePeak(TorchDispatchMode):
    """Inside the block: the bytes of the tensors torch makes that are still alive (`live`), and the
    most at once (`peak`, reached by `peak_op`'s output). A view is not counted: its base is, if the
    block made it."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.alive = 0, 0, set()
        self.peak_op = ""  # the op whose output made the peak, and that output's shape

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output in an input's storage (a view, an in-place op) is no new memory.
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in self.alive and storage.data_ptr() not in inputs:
                key, size = storage.data_ptr(), storage.nbytes()
                self.alive.add(key)
                self.live += size
                if self.live > self.peak:
                    self.peak, self.peak_op = self.live, f"{func} -> {tuple(tensor.shape)}"
                weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self.alive.discard(key)


def parse_run(text: str) -> tuple[str, int | None]:
    """'whole' -> ('whole', None); 'split' -> ('split', 0); 'chunk:2048' -> ('chunk:2048', 2048).

    >>> parse_run("whole"), parse_run("split"), parse_run("chunk:2048")
    (('whole', None), ('split', 0), ('chunk:2048', 2048))
    """
    if text == "whole":
        return text, None
    if text == "split":
        return text, 0
    if text.startswith("chunk:") and text[6:].isdigit() and int(text[6:]) > 0:
        return text, int(text[6:])
    raise SystemExit(f"live_peak.py: --runs takes whole, split and chunk:N (N tokens), got {text!r}")


def model_of(config, layers: int, dtype: torch.dtype, lora_dropout: float):
    """`layers` decoder layers of `config`, random weights in `dtype`, checkpointed, LoRA r=8 on every
    linear layer but the head (peft, as the loop adds it)."""
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    targets = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    targets.remove("lm_head")
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=lora_dropout, target_modules=targets)
    return peft.get_peft_model(model, lora).train()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", required=True, help="a model's config.json (Phi-3-mini's: its widths)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512, help="tokens a row")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the peak is one layer's backward)")
    parser.add_argument("--runs", default="whole,split,chunk:4096,chunk:2048")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="the chunked loss's positions a chunk (0: whole)")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--json", help="append one JSON line a run to this file")
    args = parser.parse_args(argv)
    runs = [parse_run(text) for text in args.runs.split(",")]

    from transformers import AutoConfig

    from yoda_raw import halves
    from yoda_raw.loss import token_loss_sum

    config = AutoConfig.from_pretrained(Path(args.config).parent if args.config.endswith(".json") else args.config)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    ids = torch.randint(2, config.vocab_size, (args.rows, args.tokens), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    hidden_mib = ids.numel() * config.hidden_size * dtype.itemsize / MiB
    shape = f"{args.rows} x {args.tokens} tokens, {args.layers} layers, {args.dtype}"
    print(f"{shape}; a (B, T, H) tensor is {hidden_mib:.0f} MiB")
    for name, chunk in runs:
        model = model_of(config, args.layers, dtype, args.lora_dropout)
        if chunk is not None:
            halves.split_layers(model, mlp_chunk=chunk)
        start = time.perf_counter()
        with LivePeak() as counter:
            token_loss_sum(model, batch, args.loss_chunk).backward()
        seconds = time.perf_counter() - start
        peak = round(counter.peak / MiB, 1)
        record = {"run": name, "peak_live_mib": peak, "peak_op": counter.peak_op, "step_s": round(seconds, 1)}
        print(f"{name:12} peak of the step's live tensors {peak:8.1f} MiB, at {counter.peak_op}   ({seconds:.0f} s)")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**record, **vars(args)}) + "\n")
        del model


if __name__ == "__main__":
    main()
