"""The reference: the same configuration through TRL's SFTTrainer, set up as the tutorial does
(4-bit NF4 with fp32 compute dtype, prepare_model_for_kbit_training, LoRA r=8 on the same four
modules, the tutorial's SFTConfig), measured by the rules of benchmarks/README.md, as bench_loop.py is.

    python benchmarks/bench_sft.py                      # Phi-3-mini-4k, random weights, 16 x 64
    python benchmarks/bench_sft.py --model CHECKPOINT   # a saved checkpoint (run_all.py shares one)
    python benchmarks/bench_sft.py --preset tiny --warmup 1 --steps 3   # a tiny model, on a CPU

Timing: a TrainerCallback synchronizes the GPU and reads the clock at every step end; a step's
time is the gap between two step ends (as in our loop: data, forward, backward, clip, optimizer
and the trainer's own per-step work). Tokens per step are counted by wrapping the trainer's data
collator (non-pad positions; supervised = next-token label not -100). Peaks are reset when
training begins, after the model is loaded. SFTTrainer trains on every token here (the tutorial's
`messages` data set: assistant_only_loss is False), so its supervised tokens/s is about its
tokens/s, while ours by default supervises the assistant's tokens only: compare tokens/s.
"""

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # yoda_raw and benchmarks/

from benchmarks import common  # noqa: E402

TARGETS = ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_sft.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=["tutorial", "tiny"],
        default="tutorial",
        help="tutorial: Phi-3-mini-4k (random weights unless --model). tiny: yoda_raw's tiny model, CPU-friendly.",
    )
    parser.add_argument("--model", default=None, help="Checkpoint folder to load (default: build random weights).")
    parser.add_argument(
        "--tokenizer", default=None, help="Tokenizer folder (default: $YODA_RAW_DATA/phi3-mini-4k-instruct)."
    )
    parser.add_argument(
        "--dataset", default=None, help="A .jsonl with sentence / translation_extra (default: the yoda set)."
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="per_device_train_batch_size (rows per step; default 16)."
    )
    parser.add_argument("--max-length", type=int, default=64, help="SFTConfig max_length (tokens per row; default 64).")
    parser.add_argument("--optim", default="paged_adamw_8bit", help="SFTConfig optim (default paged_adamw_8bit).")
    parser.add_argument(
        "--quant-compute-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="bnb_4bit_compute_dtype (the tutorial's: float32).",
    )
    parser.add_argument(
        "--whole-run",
        action="store_true",
        help="The tutorial's whole run: 10 epochs over the data as it is (not repeated to --steps), the adapter "
        "saved at the end. benchmarks/lab/sft_tutorial_run.sh times it from process start.",
    )
    parser.add_argument("--warmup", type=int, default=3, help="Steps run before timing starts (default 3).")
    parser.add_argument("--steps", type=int, default=8, help="Timed optimizer steps (default 8).")
    parser.add_argument("--name", default="sft", help="Label of the measurement in the output.")
    parser.add_argument("--json", default=None, help="Append the result as one JSON line to this file.")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="Peak TFLOP/s for MFU (default: the GPU's bf16 dense peak)."
    )
    return parser.parse_args(argv)


def load_pairs(path: str) -> list[dict]:
    """The tutorial's data as a `messages` data set: sentence -> user, translation_extra -> assistant."""
    return [
        {
            "messages": [
                {"role": "user", "content": row["sentence"]},
                {"role": "assistant", "content": row["translation_extra"]},
            ]
        }
        for row in common.read_jsonl(path)
    ]


class CountingCollator:
    """Wraps the trainer's collator and records each batch's token counts, in order."""

    def __init__(self, collator):
        self.collator, self.counts = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        supervised = int((batch["labels"][:, 1:] != -100).sum())
        self.counts.append((tokens, supervised))
        return batch


def make_step_clock(device_type: str, counter: CountingCollator):
    """A TrainerCallback that reads the clock (after a GPU sync) at train begin and every step end.
    Training begins again after an out-of-memory retry (auto_find_batch_size): all starts over."""
    import torch
    from transformers import TrainerCallback

    from yoda_raw import meter

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends, self.device_used = [], []

        def _now(self) -> float:
            if device_type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            meter.reset_peaks(torch.device(device_type))
            counter.counts.clear()
            self.ends, self.device_used = [self._now()], []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(self._now())
            used = meter.nvml_used_bytes(torch.device(device_type)) if device_type == "cuda" else None
            if used is not None:
                self.device_used.append(used / common.GIB)

    return StepClock()


@contextlib.contextmanager
def checkpoint(args, vocab_size: int):
    """The model folder: --model, or random weights written to a temporary folder."""
    if args.model:
        yield args.model
        return
    with tempfile.TemporaryDirectory(prefix="bench_sft_random_") as folder:
        if args.preset == "tiny":
            import transformers

            from yoda_raw import tiny

            transformers.set_seed(42)
            model = transformers.AutoModelForCausalLM.from_config(tiny.model_config(vocab_size))
            model.save_pretrained(folder)
        else:
            common.save_random_checkpoint(str(common.phi3_dir()), folder)
        yield folder


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        common.fail("--warmup and --steps must be at least 1 (the first step is never timed)")
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from yoda_raw import tiny

    on_cuda = torch.cuda.is_available()
    if args.preset == "tiny":
        tokenizer = tiny.build_tokenizer()
        dataset_path = args.dataset or tiny.TINY_DATASET
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or common.phi3_dir())
        dataset_path = args.dataset or common.yoda_jsonl()
    tokenizer.pad_token = tokenizer.unk_token  # the tutorial's

    total_steps = args.warmup + args.steps
    pairs = load_pairs(dataset_path)
    if not args.whole_run:
        pairs = pairs * common.copies_needed(len(pairs), args.batch_size * args.max_length, total_steps)
    dataset = datasets.Dataset.from_list(pairs)

    started = time.perf_counter()
    with checkpoint(args, len(tokenizer)) as folder, tempfile.TemporaryDirectory(prefix="bench_sft_out_") as out:
        # The tutorial's model: 4-bit NF4, double quant, fp32 compute; prepared for k-bit training; LoRA.
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, args.quant_compute_dtype),
        )
        model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", quantization_config=bnb_config)
        model = prepare_model_for_kbit_training(model)
        lora = LoraConfig(
            r=8, lora_alpha=16, bias="none", lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=TARGETS
        )
        model = get_peft_model(model, lora)
        trainable, total = model.get_nb_trainable_parameters()

        # The tutorial's SFTConfig; only the run length, outputs and (for sweeps) rows, tokens
        # and optimizer differ.
        sft_config = SFTConfig(
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            gradient_accumulation_steps=1,
            per_device_train_batch_size=args.batch_size,
            auto_find_batch_size=True,
            max_length=args.max_length,
            packing=True,
            packing_strategy="wrapped",
            num_train_epochs=10,
            learning_rate=3e-4,
            optim=args.optim,
            logging_steps=10,
            output_dir=out,
            report_to="none",
            bf16=on_cuda and torch.cuda.is_bf16_supported(including_emulation=False),
            use_cpu=not on_cuda,
            max_steps=-1 if args.whole_run else total_steps,  # benchmark: a fixed number of steps
            save_strategy="no",  # benchmark: no checkpoints
            disable_tqdm=True,
        )
        trainer = SFTTrainer(model=model, processing_class=tokenizer, args=sft_config, train_dataset=dataset)
        trainer.data_collator = counter = CountingCollator(trainer.data_collator)
        clock = make_step_clock("cuda" if on_cuda else "cpu", counter)
        trainer.add_callback(clock)
        output = trainer.train()
        if args.whole_run:
            trainer.save_model(out)  # the adapter, as the tutorial ends
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    # The trainer looks one batch ahead, so counts may hold one more batch than steps.
    gaps = [b - a for a, b in zip(clock.ends[:-1], clock.ends[1:], strict=True)]
    steps = [
        {"step_s": gap, "tokens": tokens, "supervised_tokens": supervised}
        for gap, (tokens, supervised) in zip(gaps, counter.counts[: len(gaps)], strict=True)
    ]
    result = {"name": args.name, "pipeline": "trl_sft", "device": common.device_name()}
    result["config"] = {
        "rows": getattr(trainer, "_train_batch_size", args.batch_size),  # after auto_find_batch_size
        "tokens_per_row": args.max_length,
        "quant": "nf4",
        "precision": "bf16" if sft_config.bf16 else "fp32",
        "quant_compute_dtype": args.quant_compute_dtype,
        "fp32_frozen": True,  # prepare_model_for_kbit_training upcasts norms, embeddings and head
        "gradient_checkpointing": True,
        "optim": args.optim,
        "lora_r": 8,
        "train_on": "all",
        "grad_accum": 1,
        "model": "tiny" if args.preset == "tiny" else folder,
        "init": "random",
    }
    result |= common.summarise(steps, args.warmup)
    result |= common.flops_figures(
        result["tokens_per_s"], trainable, total, common.peak_flops_for("cuda" if on_cuda else "cpu", args.peak_tflops)
    )
    result |= {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / common.GIB, 3) if on_cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / common.GIB, 3) if on_cuda else None,
        "device_used_gib": round(max(clock.device_used), 3) if clock.device_used else None,
        "trainable_params": trainable,
        "total_params": total,
        "loss_first": losses[0] if losses else output.training_loss,
        "loss_last": losses[-1] if losses else output.training_loss,
        "wall_s": round(time.perf_counter() - started, 1),
        "allocated_at_start_gib": None,
        "full_step_share": common.full_step_share(steps[args.warmup :], result["config"]["rows"] * args.max_length),
    }
    if result["config"]["rows"] != args.batch_size:
        result["auto_find_batch_size"] = f"reduced {args.batch_size} -> {result['config']['rows']} rows"
    common.write_result(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
