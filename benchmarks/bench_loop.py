"""Time yoda_raw's training loop: warm-up steps, then N timed optimizer steps, through the very
function run.py calls (`yoda_raw.train.main`), not a copy of it.

    python benchmarks/bench_loop.py                          # Phi-3-mini-4k, random weights, 16 x 64
    python benchmarks/bench_loop.py --batch-size 64 --max-length 256 --optim adamw
    python benchmarks/bench_loop.py --preset tiny --warmup 1 --steps 3   # a tiny model, on a CPU

Every option of run.py is accepted (same parser) and sets the configuration; this script adds
its own (--warmup, --steps, --json, ...). By default the model is the Phi-3-mini-4k architecture
built from its config.json ($YODA_RAW_DATA/phi3-mini-4k-instruct) with random weights: speed and
memory are the real model's, nothing is downloaded, the losses mean nothing.

How it measures: `main(cfg)` runs with logging_steps=1 and max_steps=warmup+steps, so the loop
writes one line per step to metrics.jsonl; each line's tokens/s covers exactly one step, from the
end of the previous step's log to the end of its own (a host sync), and its peak memory is the
loop's (peaks are reset when fit() starts). Medians are taken over the steps after warm-up
(benchmarks/common.py has the rules, shared with bench_sft.py). The data set is repeated as often
as needed so that every measured step is a full batch of full rows (wrapped packing).

Several measurements in one process (--grid, --budget-gib) reload the model for each, free
everything between them and record `allocated_at_start_gib` to show they started clean.
`--breakdown` adds where the peak memory went; `--snapshot` records a torch memory snapshot for
https://pytorch.org/memory_viz. One JSON line per measurement goes to --json (and to stdout
after "RESULT ").
"""

import argparse
import contextlib
import dataclasses
import gc
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run.py, yoda_raw and benchmarks/

from benchmarks import common  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="bench_loop.py",
        description=__doc__.split("\n\n")[0],
        epilog="All other options are run.py's (see `python run.py --help`), e.g. --batch-size, --max-length, "
        "--optim, --quant, --precision, --no-gradient-checkpointing, --preset tiny.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # leave run.py's options (--warmup-steps, ...) to run.py's parser
    )
    parser.add_argument("--warmup", type=int, default=3, help="Steps run before timing starts (default 3).")
    parser.add_argument("--steps", type=int, default=8, help="Timed optimizer steps (default 8).")
    parser.add_argument("--min-steps", type=int, default=3, help="With --timed-tokens: at least this many timed steps.")
    parser.add_argument(
        "--timed-tokens",
        type=int,
        default=0,
        help="Time only as many steps (at least --min-steps, at most --steps) as this many tokens need: "
        "keeps large configurations short. 0: always --steps.",
    )
    parser.add_argument("--name", default=None, help="Label of the measurement in the output.")
    parser.add_argument("--json", default=None, help="Append one JSON line per measurement to this file.")
    parser.add_argument(
        "--grid",
        default=None,
        help="Measure several ROWSxTOKENS points in this process, e.g. 4x64,16x256 (rows per step x tokens per row).",
    )
    parser.add_argument(
        "--budget-gib",
        default=None,
        help="Emulate cards of these sizes (GiB, e.g. 6,8,24) with torch.cuda.set_per_process_memory_fraction "
        "and find the most rows of --budget-tokens that fit (CUDA only).",
    )
    parser.add_argument(
        "--budget-tokens", type=int, default=512, help="Tokens per row when searching a budget (default 512)."
    )
    parser.add_argument(
        "--budget-start-rows",
        default=None,
        help="Rows to start each budget's search from (one per budget; default 4 rows per GiB). "
        "Start above the answer: the search only goes down.",
    )
    parser.add_argument("--breakdown", action="store_true", help="Also report where the peak memory went.")
    parser.add_argument("--snapshot", default=None, help="Write a torch CUDA memory snapshot (pickle) here.")
    parser.add_argument(
        "--snapshot-entries", type=int, default=8000, help="Allocation events the snapshot keeps (default 8000)."
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="Peak FLOP/s (in TFLOP/s) for MFU; default: the GPU's bf16 dense peak from yoda_raw/meter.py.",
    )
    return parser.parse_known_args(argv)


def parse_config(rest: list[str]):
    """run.py's own parser, with the benchmark's defaults for model and data: the Phi-3-mini
    architecture with random weights, and the yoda set from the local data folder."""
    from run import parse_config as run_parse_config

    preset = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--preset"), "tutorial")
    defaults = []
    if preset == "tutorial" and "--model" not in rest:
        if not common.phi3_dir().is_dir():
            common.fail(f"{common.phi3_dir()} not found: set YODA_RAW_DATA, or pass --model (and --tokenizer)")
        defaults += ["--model", str(common.phi3_dir()), "--init", "random"]
    if preset == "tutorial" and "--dataset" not in rest and common.yoda_jsonl().is_file():
        defaults += ["--dataset", str(common.yoda_jsonl())]
    return run_parse_config(defaults + rest)


def timed_steps_for(args, tokens_per_step: int) -> int:
    if not args.timed_tokens:
        return args.steps
    return min(args.steps, max(args.min_steps, math.ceil(args.timed_tokens / tokens_per_step)))


def main(argv: list[str]) -> int:
    args, rest = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        common.fail("--warmup and --steps must be at least 1 (the first step is never timed)")
    cfg = parse_config(rest)
    import torch

    if args.budget_gib and not torch.cuda.is_available():
        common.fail("--budget-gib needs a CUDA GPU")
    if args.snapshot and not torch.cuda.is_available():
        common.fail("--snapshot needs a CUDA GPU")

    if args.budget_gib:
        budgets = [float(b) for b in args.budget_gib.split(",")]
        starts = (
            [int(r) for r in args.budget_start_rows.split(",")]
            if args.budget_start_rows
            else [max(1, round(4 * b)) for b in budgets]
        )
        if len(starts) != len(budgets):
            common.fail("--budget-start-rows needs one value per --budget-gib value")
        context_gib = cuda_context_gib()
        for budget, start in zip(budgets, starts, strict=True):
            result = measure_budget(cfg, args, budget, start, context_gib)
            common.write_result(result, args.json)
        return 0

    points = parse_grid(args.grid) if args.grid else [(cfg.batch_size, cfg.max_length)]
    for rows, tokens in points:
        point = dataclasses.replace(cfg, batch_size=rows, max_length=tokens)
        name = args.name or "loop"
        if args.grid:
            name = f"{name}-{rows}x{tokens}"
        result = measure(point, args, name, timed_steps_for(args, rows * tokens))
        if len(points) > 1:
            result["shared_process"] = f"{len(points)} measurements in one process, in order {args.grid}"
        common.write_result(result, args.json)
    return 0


def parse_grid(text: str) -> list[tuple[int, int]]:
    """'4x64,16x256' -> [(4, 64), (16, 256)]."""
    try:
        return [tuple(int(n) for n in point.lower().split("x")) for point in text.split(",")]
    except ValueError:
        common.fail(f"--grid {text}: expected ROWSxTOKENS[,ROWSxTOKENS...], e.g. 4x64,16x256")


def measure(cfg, args, name: str, timed: int, budget: dict | None = None) -> dict:
    """Run the real loop once for `cfg` and return one result (common.RESULT_KEYS and more)."""
    import torch

    from yoda_raw import train

    on_cuda = torch.cuda.is_available()
    total_steps = args.warmup + timed
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yoda_raw_bench_") as tmp:
        cfg = dataclasses.replace(
            cfg,
            dataset=str(enough_data(cfg, tmp, total_steps)),
            max_steps=total_steps,
            logging_steps=1,  # one metrics line per step
            eval_fraction=0.0,
            packing="wrapped",
            save_steps=0,
            resume=None,
            output_dir=str(Path(tmp) / "out"),
            overwrite=True,
            samples=False,
            report_to="none",
            auto_batch_size=budget is not None,  # only a budget search may change the batch
        )
        allocated_at_start = torch.cuda.memory_allocated() / common.GIB if on_cuda else None
        with memory_history(args.snapshot, args.snapshot_entries):
            run = train.main(cfg)
        records = last_attempt(common.read_jsonl(Path(cfg.output_dir) / "metrics.jsonl"))
        tap = {"optimizer": run.fit.optimizer, "allocated_before_fit": run.fit.allocated_before_loop_bytes}
        breakdown = memory_breakdown(run.live.model, tap, records[-1]) if args.breakdown else None
    trainable, total = run.trainable_params, run.total_params
    rows = run.fit.batch_size  # may differ from cfg.batch_size after a budget search
    steps = [step_reading(r, rows * cfg.max_length) for r in records]
    result = {"name": name, "pipeline": "yoda_raw", "device": common.device_name()}
    result["config"] = {
        "rows": rows,
        "tokens_per_row": cfg.max_length,
        "quant": cfg.quant,
        "precision": resolved_precision(cfg.precision),
        "quant_compute_dtype": cfg.quant_compute_dtype,
        "fp32_frozen": cfg.fp32_frozen,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "optim": cfg.optim,
        "lora_r": cfg.lora_r,
        "train_on": cfg.train_on,
        "grad_accum": cfg.grad_accum,
        "model": cfg.model,
        "init": cfg.init,
    }
    result |= common.summarise(steps, args.warmup)
    result |= common.flops_figures(
        result["tokens_per_s"],
        trainable,
        total,
        common.peak_flops_for("cuda" if on_cuda else "cpu", args.peak_tflops),
    )
    last = records[-1]
    result |= {
        "peak_allocated_gib": last.get("peak_allocated_gib"),
        "peak_reserved_gib": last.get("peak_reserved_gib"),
        "device_used_gib": max((r["device_used_gib"] for r in records if "device_used_gib" in r), default=None),
        "trainable_params": trainable,
        "total_params": total,
        "loss_first": records[0]["loss"],
        "loss_last": last["loss"],
        "wall_s": round(time.perf_counter() - started, 1),
        "allocated_at_start_gib": round(allocated_at_start, 3) if on_cuda else None,
        "full_step_share": common.full_step_share(steps[args.warmup :], rows * cfg.max_length),
        "step_s_source": "metrics.jsonl" if "step_s" in last else "rows x tokens / tokens_per_s",
    }
    if on_cuda and "device_used_gib" not in last:
        result["device_used_gib_note"] = "NVML unavailable (pip install nvidia-ml-py)"
    if budget:
        result["budget"] = budget | {"rows_found": rows}
    if breakdown:
        result["memory_breakdown"] = breakdown
    if args.snapshot:
        result["snapshot"] = str(args.snapshot)
    del run, tap  # the model and the optimizer with its state, before release()
    release()
    return result


def resolved_precision(requested: str) -> str:
    """What --precision auto became on this device (the same decision the loop made)."""
    import torch

    from yoda_raw.precision import choose_precision

    return choose_precision(requested, torch.device("cuda" if torch.cuda.is_available() else "cpu")).name


def step_reading(record: dict, full_step_tokens: int) -> dict:
    """One metrics.jsonl line -> step_s, tokens, supervised_tokens of that step.

    The loop's record has step_s and the two throughputs; tokens are throughput x time. (A loop
    without step_s in its record: the step is taken to be `full_step_tokens` non-pad tokens,
    which holds for wrapped packing with enough data: `full_step_share` in the result checks it.)
    """
    step_s = record.get("step_s") or full_step_tokens / record["tokens_per_s"]
    return {
        "step_s": step_s,
        "tokens": record["tokens_per_s"] * step_s,
        "supervised_tokens": record["supervised_tokens_per_s"] * step_s,
    }


def enough_data(cfg, folder: str, steps: int) -> str:
    """The data set, repeated so that `steps` full steps fit in one epoch (a .jsonl file)."""
    if not str(cfg.dataset).endswith(".jsonl"):
        return cfg.dataset  # used as is; `full_step_share` in the result says whether it sufficed
    n = len(common.read_jsonl(cfg.dataset))
    copies = common.copies_needed(n, cfg.batch_size * cfg.max_length * cfg.grad_accum, steps)
    return str(common.repeat_jsonl(cfg.dataset, copies, folder)) if copies > 1 else cfg.dataset


def last_attempt(records: list[dict]) -> list[dict]:
    """The records of the run that finished: after an out-of-memory retry (budget search) the
    file also holds the first steps of the attempts that failed; the last one starts at step 1."""
    starts = [i for i, r in enumerate(records) if r["step"] == 1]
    if not starts:
        raise RuntimeError("metrics.jsonl holds no step 1: was logging_steps 1?")
    return records[starts[-1] :]


def release() -> None:
    """Free what the last run left, so the next measurement in this process starts clean."""
    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- budgets --------------------------------------------------------------------------------------


def cuda_context_gib() -> float:
    """Device memory this process uses outside torch's allocator: the CUDA context (~0.5 GiB)."""
    import torch

    torch.zeros(1, device="cuda")  # creates the context
    free, total = torch.cuda.mem_get_info()
    return (total - free - torch.cuda.memory_reserved()) / common.GIB


def measure_budget(cfg, args, budget_gib: float, start_rows: int, context_gib: float) -> dict:
    """The most rows of --budget-tokens that train within `budget_gib` GiB, and the speed there.

    The card is emulated: torch's allocator may hold at most budget - CUDA context, via
    torch.cuda.set_per_process_memory_fraction. The search is the loop's own --auto-batch-size
    (accelerate's find_executable_batch_size): start at `start_rows`, and on out-of-memory retry
    with 0.9x the rows, in the same process with the model loaded once. So the answer is within
    10% of the true limit, and only if the start was above it (`start_fit` says when it was not).
    """
    import torch

    total_gib = torch.cuda.get_device_properties(0).total_memory / common.GIB
    allocator_gib = budget_gib - context_gib
    torch.cuda.set_per_process_memory_fraction(allocator_gib / total_gib)
    point = dataclasses.replace(cfg, batch_size=start_rows, max_length=args.budget_tokens)
    budget = {
        "budget_gib": budget_gib,
        "emulation": "torch.cuda.set_per_process_memory_fraction",
        "allocator_limit_gib": round(allocator_gib, 3),
        "cuda_context_gib": round(context_gib, 3),
        "start_rows": start_rows,
    }
    result = measure(
        point, args, f"budget-{budget_gib:g}gib", timed_steps_for(args, start_rows * args.budget_tokens), budget
    )
    result["budget"]["start_fit"] = result["config"]["rows"] == start_rows
    torch.cuda.set_per_process_memory_fraction(1.0)
    return result


# --- memory breakdown and snapshot ----------------------------------------------------------------


@contextlib.contextmanager
def tap_optimizer(train_module):
    """Keep a reference to the optimizer fit() builds, and read torch's allocated memory just
    before it is built (the model alone). It wraps `train.build_optimizer` for the duration of
    the run and returns exactly what the original returns: the loop runs unchanged."""
    import torch

    tap = {"optimizer": None, "allocated_before_fit": None}
    original = train_module.build_optimizer

    def build_and_keep(*a, **k):
        if torch.cuda.is_available():
            tap["allocated_before_fit"] = torch.cuda.memory_allocated()
        tap["optimizer"] = original(*a, **k)
        return tap["optimizer"]

    train_module.build_optimizer = build_and_keep
    try:
        yield tap
    finally:
        train_module.build_optimizer = original


@contextlib.contextmanager
def memory_history(path: str | None, entries: int):
    """torch.cuda.memory._record_memory_history around the run, dumped to `path` (a pickle for
    https://pytorch.org/memory_viz). Recording slows every allocation: time nothing with it."""
    if not path:
        yield
        return
    import torch

    torch.cuda.memory._record_memory_history(max_entries=entries, stacks="python")  # python stacks: a smaller file
    try:
        yield
    finally:
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)


def tensor_bytes(tensors, seen: set, device_type: str | None = None) -> int:
    """Bytes of the tensors not counted yet (by storage address), on `device_type` (or any)."""
    total = 0
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage"):
            continue
        if device_type is not None and t.device.type != device_type:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def quant_state_tensors(state) -> list:
    """The tensors of a bitsandbytes QuantState: absmax (8-bit with double quant), the code book,
    the offset, and the nested state's fp32 absmax and code book."""
    if state is None:
        return []
    found = [state.absmax, state.code, getattr(state, "offset", None)]
    return found + quant_state_tensors(getattr(state, "state2", None))


def count_model(model, device_type: str) -> dict:
    """Bytes of the model's tensors on `device_type`, by kind, counted one by one."""
    try:
        from bitsandbytes.nn import Params4bit
    except ImportError:
        Params4bit = None  # noqa: N806
    seen: set = set()
    parts = {"weights_4bit": 0, "quant_state": 0, "weights_other": 0, "lora_params": 0}
    for param in model.parameters():
        if Params4bit is not None and isinstance(param, Params4bit):
            parts["weights_4bit"] += tensor_bytes([param], seen, device_type)
            parts["quant_state"] += tensor_bytes(quant_state_tensors(param.quant_state), seen, device_type)
        elif param.requires_grad:
            parts["lora_params"] += tensor_bytes([param], seen, device_type)
        else:
            parts["weights_other"] += tensor_bytes([param], seen, device_type)
    parts["weights_other"] += tensor_bytes(model.buffers(), seen, device_type)  # rotary tables and such
    return parts


def count_optimizer(optimizer, device_type: str) -> dict:
    """Bytes of optimizer state: in device memory, and paged. bitsandbytes' paged buffers are
    CUDA unified memory wrapped as CPU tensors (`is_paged`), so they are told apart by that flag."""
    seen: set = set()
    tensors = [t for state in optimizer.state.values() for t in state.values() if hasattr(t, "untyped_storage")]
    paged = [t for t in tensors if getattr(t, "is_paged", False)]
    plain = [t for t in tensors if not getattr(t, "is_paged", False)]
    return {
        "optimizer_state": tensor_bytes(plain, seen, device_type),
        "optimizer_state_paged": tensor_bytes(paged, seen),
    }


TOLERANCE_GIB = 0.1  # counted persistent parts vs torch's allocated memory at rest


def memory_breakdown(model, tap: dict, last_record: dict) -> dict:
    """Where the loop's peak memory went, in GiB.

    Counted tensor by tensor: 4-bit weights (packed, 0.5 byte a weight) and their quantization
    state, the other (non-quantized) weights and buffers, the LoRA parameters, their gradients
    (one per LoRA parameter, same dtype), and the optimizer state (paged state apart: it lives in
    unified memory, outside torch's counters, and NVML shows it).
    Derived: activations at peak = peak allocated - (weights + LoRA + gradients + optimizer
    state), i.e. everything else alive at the peak: saved activations, recomputed blocks, logits,
    loss buffers, dequantized weight tiles, cuBLAS workspaces. Gradients are counted whole, though
    at the peak (usually early in backward) only part of them exists, so activations may be
    understated by up to the gradients' size. Allocator beyond = peak reserved - peak allocated.
    Check: the counted persistent parts are compared with torch.cuda.memory_allocated() at two
    quiet moments, after loading (weights + LoRA) and after the loop (weights + LoRA + optimizer
    state; gradients are freed by zero_grad(set_to_none=True)); `adds_up` says whether both agree
    within TOLERANCE_GIB.
    """
    import torch

    gib = common.GIB
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    parts = count_model(model, device_type)
    parts["lora_grads"] = parts["lora_params"]
    parts |= (
        count_optimizer(tap["optimizer"], device_type)
        if tap["optimizer"] is not None
        else {"optimizer_state": 0, "optimizer_state_paged": 0}
    )
    out = {f"{k}_gib": round(v / gib, 6) for k, v in parts.items()}
    if tap["optimizer"] is None:  # train.fit no longer calls train.build_optimizer: nothing to count
        out["optimizer_note"] = "optimizer not observed: optimizer state not counted"
    out["weights_4bit_gib"] = round((parts["weights_4bit"] + parts["quant_state"]) / gib, 6)  # incl. quant state
    if not torch.cuda.is_available():
        return out | {"note": "CPU: counted parts only; torch's memory counters are CUDA's"}
    persistent = parts["weights_4bit"] + parts["quant_state"] + parts["weights_other"] + parts["lora_params"]
    at_peak = persistent + parts["lora_grads"] + parts["optimizer_state"]
    peak_allocated = last_record["peak_allocated_gib"] * gib
    peak_reserved = last_record["peak_reserved_gib"] * gib
    after_load = tap["allocated_before_fit"]
    after_loop = torch.cuda.memory_allocated()
    mismatch_load = (after_load - persistent) / gib if after_load is not None else None
    mismatch_loop = (after_loop - persistent - parts["optimizer_state"]) / gib
    checks = [m for m in (mismatch_load, mismatch_loop) if m is not None]
    out |= {
        "activations_at_peak_gib": round((peak_allocated - at_peak) / gib, 4),
        "allocator_beyond_allocated_gib": round((peak_reserved - peak_allocated) / gib, 4),
        "peak_allocated_gib": last_record["peak_allocated_gib"],
        "peak_reserved_gib": last_record["peak_reserved_gib"],
        "device_used_gib": last_record.get("device_used_gib"),
        "allocated_after_load_gib": round(after_load / gib, 4) if after_load is not None else None,
        "allocated_after_loop_gib": round(after_loop / gib, 4),
        "mismatch_after_load_gib": round(mismatch_load, 4) if mismatch_load is not None else None,
        "mismatch_after_loop_gib": round(mismatch_loop, 4),
        "tolerance_gib": TOLERANCE_GIB,
        "adds_up": all(abs(m) <= TOLERANCE_GIB for m in checks),
    }
    if out["device_used_gib"] is not None:
        # NVML's view minus torch's: CUDA context, paged optimizer state, library workspaces.
        out["outside_torch_gib"] = round(out["device_used_gib"] - last_record["peak_reserved_gib"], 4)
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
