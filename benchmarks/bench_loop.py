"""Time yoda_raw's training loop: warm-up steps, then N timed optimizer steps, through the very
function run.py calls (`yoda_raw.train.main`), not a copy of it.

    python benchmarks/bench_loop.py                          # Phi-3-mini-4k, random weights, 16 x 64
    python benchmarks/bench_loop.py --batch-size 64 --max-length 256 --optim adamw
    python benchmarks/bench_loop.py --cards 6,8,12 --card-tokens 64,512   # what fits on those cards
    python benchmarks/bench_loop.py --preset tiny --warmup 1 --steps 3   # a tiny model, on a CPU

Every option of run.py is accepted (same parser) and sets the configuration; this script adds
its own (--warmup, --steps, --json, ...). By default the model is the Phi-3-mini-4k architecture
built from its config.json ($YODA_RAW_DATA/phi3-mini-4k-instruct) with random weights: speed and
memory are the real model's, nothing is downloaded, the losses mean nothing.

`main(cfg)` runs with logging_steps=1, so the records it returns are one per step; the measuring
rules are in benchmarks/README.md. Several measurements in one process (--grid, --cards) reload
the model for each and free everything between them. One JSON line per measurement goes to
--json (and to stdout after "RESULT ").
"""

import argparse
import contextlib
import dataclasses
import gc
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run.py, yoda_raw and benchmarks/

from benchmarks import common  # noqa: E402
from yoda_raw.hooks import Observer  # noqa: E402 (imports nothing: the run's own imports stay in main)

# Prior for the first guess of a card search, from the H200's rows x tokens grid (our defaults):
# NVML device memory in use ~ A + B x tokens per step. Later guesses fit a line to the runs so far.
PRIOR_A_GIB, PRIOR_B_GIB_PER_TOKEN = 3.7, 0.00088


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="bench_loop.py",
        description=__doc__.split("\n\n")[0],
        epilog="All other options are run.py's (see `python run.py --help`), e.g. --batch-size, --max-length, "
        "--optim, --quant, --precision, --no-gradient-checkpointing, --preset tiny.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # leave run.py's options (--warmup-steps, ...) to run.py's parser
    )
    add = parser.add_argument
    add("--warmup", type=int, default=3, help="Steps run before timing starts (default 3).")
    add("--steps", type=int, default=8, help="Timed optimizer steps (default 8).")
    add("--min-steps", type=int, default=3, help="With --timed-tokens: at least this many timed steps.")
    add(
        "--timed-tokens",
        type=int,
        default=0,
        help="Time only as many steps (at least --min-steps, at most --steps) as this many tokens need: "
        "keeps large configurations short. 0: always --steps.",
    )
    add("--name", default=None, help="Label of the measurement in the output.")
    add("--json", default=None, help="Append one JSON line per measurement to this file.")
    add("--grid", default=None, help="Measure several ROWSxTOKENS points in this process, e.g. 4x64,16x256.")
    add(
        "--cards",
        default=None,
        help="Card sizes in GiB, e.g. 6,8,24: for each, and each of --card-tokens, the most rows that train with "
        "NVML's device memory in use at most the card less --margin-gib (CUDA only).",
    )
    add("--card-tokens", default="64,256,512", help="Tokens per row to search the rows of (default 64,256,512).")
    add("--margin-gib", type=float, default=0.3, help="Memory a card keeps for the display and such (default 0.3).")
    add("--max-rows", type=int, default=64, help="The most rows a card search tries (default 64).")
    add("--max-probes", type=int, default=5, help="Runs a card search may spend on one card and length (default 5).")
    add("--card-prior", default=None, help="A,B: first guess device GiB = A + B x tokens per step.")
    add("--known-fit", default=None, help="TOKENS:ROWS,...: rows that fit a smaller card (the search starts there).")
    add("--time-budget-s", type=float, default=None, help="Start no card search after this many seconds.")
    add("--breakdown", action="store_true", help="Also report where the peak memory went (yoda_raw/meter.py).")
    add("--snapshot", default=None, help="Write a torch CUDA memory snapshot (pickle) here.")
    add("--snapshot-entries", type=int, default=8000, help="Allocation events the snapshot keeps (default 8000).")
    add(
        "--snapshot-steps",
        default=None,
        help="FIRST-LAST (steps counted from 1): record the allocator's history over those steps only (default: the "
        "whole run). With the CUDA graph, step 1 is the eager warm-up and step 2 the capture.",
    )
    add(
        "--snapshot-stacks",
        choices=("python", "none"),
        default="python",
        help="What each recorded allocation keeps: its Python stack (default), or nothing (sizes and order only).",
    )
    add(
        "--checkpoint-early-stop",
        choices=("on", "off"),
        default="on",
        help="off: torch's checkpointing recomputes every block to its end instead of stopping once it has what "
        "the backward needs (it stops by raising an exception, which Python stacks in a snapshot may trip on).",
    )
    add(
        "--peaks-by-step",
        action="store_true",
        help="Each step's own peak allocated and reserved memory, NVML's reading and this process's own share "
        "of it at its end (the peak counters reset after every step); the result's peaks are their largest.",
    )
    add(
        "--inductor",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="Set one of torch._inductor.config's settings (a Python literal), e.g. triton.autotune_pointwise=False; "
        "may repeat.",
    )
    add("--peak-tflops", type=float, default=None, help="Peak TFLOP/s for MFU (default: yoda_raw/meter.py's).")
    return parser.parse_known_args(argv)


def parse_config(rest: list[str]):
    """run.py's own parser, with the benchmark's defaults for model and data: the Phi-3-mini
    architecture with random weights, and the yoda set from the local data folder."""
    from yoda_raw.config import parse_config as run_parse_config

    preset = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--preset"), "tutorial")
    defaults = []
    if preset == "tutorial" and "--model" not in rest:
        if not common.phi3_dir().is_dir():
            common.fail(f"{common.phi3_dir()} not found: set YODA_RAW_DATA, or pass --model (and --tokenizer)")
        defaults += ["--model", str(common.phi3_dir()), "--init", "random"]
    if preset == "tutorial" and "--dataset" not in rest and common.yoda_jsonl().is_file():
        defaults += ["--dataset", str(common.yoda_jsonl())]
    return run_parse_config(defaults + rest)


def main(argv: list[str]) -> int:
    args, rest = parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        common.fail("--warmup and --steps must be at least 1 (the first step is never timed)")
    cfg = parse_config(rest)
    import torch

    if (args.cards or args.snapshot or args.peaks_by_step) and not torch.cuda.is_available():
        common.fail("--cards, --snapshot and --peaks-by-step need a CUDA GPU")
    if args.snapshot_steps and not args.snapshot:
        common.fail("--snapshot-steps says which steps --snapshot records: add --snapshot PATH")
    for setting in args.inductor:
        set_inductor_config(setting)
    if args.cards:
        measure_cards(cfg, args)
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


def set_inductor_config(setting: str) -> None:
    """'triton.autotune_pointwise=False' -> torch._inductor.config.triton.autotune_pointwise = False."""
    import ast

    import torch._inductor.config

    name, _, text = setting.partition("=")
    *parents, leaf = name.split(".")
    target = torch._inductor.config
    try:
        for part in parents:
            target = getattr(target, part)
        getattr(target, leaf)  # an existing setting only: a typo is an error, not a new attribute
        value = ast.literal_eval(text)
    except (AttributeError, ValueError, SyntaxError):
        common.fail(f"--inductor {setting}: expected NAME=VALUE, NAME a setting of torch._inductor.config")
    setattr(target, leaf, value)


def parse_grid(text: str) -> list[tuple[int, int]]:
    """'4x64,16x256' -> [(4, 64), (16, 256)]."""
    try:
        return [tuple(int(n) for n in point.lower().split("x")) for point in text.split(",")]
    except ValueError:
        common.fail(f"--grid {text}: expected ROWSxTOKENS[,ROWSxTOKENS...], e.g. 4x64,16x256")


def timed_steps_for(args, tokens_per_step: int) -> int:
    if not args.timed_tokens:
        return args.steps
    return min(args.steps, max(args.min_steps, math.ceil(args.timed_tokens / tokens_per_step)))


def measure(cfg, args, name: str, timed: int, watch_device: bool = False) -> dict:
    """Run the real loop once for `cfg` and return one result (common.RESULT_KEYS and more).
    `watch_device`: also sample NVML's device memory in use all through (loading included)."""
    import torch
    import torch.utils.checkpoint

    from yoda_raw import meter, train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="yoda_raw_bench_") as tmp:
        cfg = dataclasses.replace(
            cfg,
            dataset=str(enough_data(cfg, tmp, args.warmup + timed)),
            max_steps=args.warmup + timed,
            logging_steps=1,  # one record per step
            eval_fraction=0.0,
            packing="wrapped",
            save_steps=0,
            resume=None,
            output_dir=str(Path(tmp) / "out"),
            overwrite=True,
            samples=False,
            report_to="none",
            auto_batch_size=False,  # the batch measured is the batch asked for
        )
        allocated_at_start = meter.allocated_bytes(device)
        memory = StepMemory(args, device)
        with meter.DeviceUsedPeak(device if watch_device else None) as device_peak:
            whole_run = None if args.snapshot_steps else args.snapshot
            # Off: every checkpointed block is recomputed to its end (torch stops as soon as it has what
            # the backward needs, by raising an exception inside the block's last ops by default).
            early_stop = args.checkpoint_early_stop == "on"
            with memory_history(whole_run, args.snapshot_entries, args.snapshot_stacks):
                with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
                    run = train.main(cfg, observer=memory)
    records = run.fit.log  # one a step: step_s, tokens, supervised_tokens, memory
    rows = run.fit.batch_size
    result = {"name": name, "pipeline": "yoda_raw", "device": common.device_name()}
    result["config"] = {
        "rows": rows,
        "tokens_per_row": cfg.max_length,
        "quant": cfg.quant,
        "precision": run.precision,
        "quant_compute_dtype": cfg.quant_compute_dtype,
        "fp32_frozen": cfg.fp32_frozen,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "cuda_graph": run.config.cuda_graph,
        "compile_layers": run.config.compile_layers,
        "reuse_dequant": run.config.reuse_dequant,
        "fp8_matmuls": run.config.fp8_matmuls,
        "seeded_dropout": run.config.seeded_dropout,
        "chunked_loss": run.config.chunked_loss,
        "loss_chunk": run.config.loss_chunk,
        "offload_activations": run.config.offload_activations,
        "split_layers": run.config.split_layers,
        "mlp_chunk": run.config.mlp_chunk,
        "compile_memory_budget": run.config.compile_memory_budget,
        "uncheckpointed_layers": cfg.uncheckpointed_layers,
        "lora_dropout": cfg.lora_dropout,
        "optim": cfg.optim,
        "lora_r": cfg.lora_r,
        "train_on": cfg.train_on,
        "grad_accum": cfg.grad_accum,
        "model": cfg.model,
        "init": cfg.init,
        # torch's allocator settings (expandable segments among them), read from the environment when
        # CUDA starts: they change the memory figures, and no option of run.py records them. torch
        # reads PYTORCH_ALLOC_CONF first, and the older PYTORCH_CUDA_ALLOC_CONF where it is unset.
        "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    result |= common.summarise(records, args.warmup)
    peak = common.peak_flops_for(device.type, args.peak_tflops)
    result |= common.flops_figures(result["tokens_per_s"], run.trainable_params, run.total_params, peak)
    last = records[-1]
    result |= {
        "peak_allocated_gib": last.get("peak_allocated_gib"),
        "peak_reserved_gib": last.get("peak_reserved_gib"),
        "device_used_gib": max((r["device_used_gib"] for r in records if "device_used_gib" in r), default=None),
        "trainable_params": run.trainable_params,
        "total_params": run.total_params,
        "loss_first": records[0]["loss"],
        "loss_last": last["loss"],
        "losses": [r["loss"] for r in records],  # every step's, warm-up included: for the learning check
        "warmup_steps_s": [r["step_s"] for r in records[: args.warmup]],  # step 1 compiles (and captures: step 2)
        "wall_s": round(time.perf_counter() - started, 1),
        "allocated_at_start_gib": round(allocated_at_start / common.GIB, 3) if allocated_at_start is not None else None,
        "full_step_share": common.full_step_share(records[args.warmup :], rows * cfg.max_length),
    }
    if memory.steps:
        result["peaks_by_step"] = memory.steps
        result["peak_allocated_gib"] = max(s["peak_allocated_gib"] for s in memory.steps)
        result["peak_reserved_gib"] = max(s["peak_reserved_gib"] for s in memory.steps)
        last = last | {k: result[k] for k in ("peak_allocated_gib", "peak_reserved_gib")}  # for the breakdown
        process = [s["process_used_gib"] for s in memory.steps if s.get("process_used_gib") is not None]
        result["process_used_gib"] = max(process) if process else None
    if device_peak.peak_bytes is not None:
        result["device_used_peak_gib"] = round(device_peak.peak_bytes / common.GIB, 3)
    reserved = meter.nvml_reserved_bytes(device) if device.type == "cuda" else None
    if reserved is not None:  # counted in every NVML reading above, before any process starts
        result["driver_reserved_gib"] = round(reserved / common.GIB, 3)
    if device.type == "cuda" and "device_used_gib" not in last:
        result["device_used_gib_note"] = "NVML unavailable (pip install nvidia-ml-py)"
    if args.breakdown:
        result["memory_breakdown"] = memory.report.breakdown_now(last)
    if args.snapshot:
        result["snapshot"] = str(args.snapshot)
    del run, memory  # the model, and the optimizer with its state
    release()
    return result


def enough_data(cfg, folder: str, steps: int) -> str:
    """The data set, repeated so that `steps` full steps fit in one epoch (a .jsonl file)."""
    if not str(cfg.dataset).endswith(".jsonl"):
        return cfg.dataset  # used as is; `full_step_share` in the result says whether it sufficed
    n = len(common.read_jsonl(cfg.dataset))
    copies = common.copies_needed(n, cfg.batch_size * cfg.max_length * cfg.grad_accum, steps)
    return str(common.repeat_jsonl(cfg.dataset, copies, folder)) if copies > 1 else cfg.dataset


def release() -> None:
    """Free what the last run left, so the next measurement in this process starts clean."""
    import torch
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def memory_history(path: str | None, entries: int, stacks: str = "python"):
    """torch.cuda.memory._record_memory_history around the block, dumped to `path` (a pickle for
    https://pytorch.org/memory_viz). Recording slows every allocation: time nothing with it.
    stacks "none" records no stack at all: gathering Python stacks inside the chunked loss's
    recompute has failed with a SystemError (benchmarks/NOTES.md, item 48)."""
    if not path:
        yield
        return

    start_recording(entries, stacks)
    try:
        yield
    finally:
        stop_recording(path)


def start_recording(entries: int, stacks: str) -> None:
    import torch

    if stacks == "none":
        torch.cuda.memory._record_memory_history(max_entries=entries, context=None)
    else:  # python stacks: a smaller file than with C++ frames
        torch.cuda.memory._record_memory_history(max_entries=entries, stacks="python")


def stop_recording(path) -> None:
    import torch

    torch.cuda.memory._dump_snapshot(str(path))
    torch.cuda.memory._record_memory_history(enabled=None)


def parse_steps(text: str) -> tuple[int, int]:
    """'2' -> (2, 2); '1-2' -> (1, 2): steps counted from 1."""
    first, _, last = text.partition("-")
    try:
        window = int(first), int(last or first)
    except ValueError:
        common.fail(f"--snapshot-steps {text}: expected FIRST-LAST, e.g. 2-2 (steps counted from 1)")
    if not 1 <= window[0] <= window[1]:
        common.fail(f"--snapshot-steps {text}: steps count from 1, the first no later than the last")
    return window


def process_used_reader(device):
    """A function that reads what NVML says this process holds on `device` (its CUDA context
    included; other processes and the idle card's own use not): bytes, or None where the driver does
    not tell (in some containers). None without NVML."""
    import os

    from yoda_raw import meter

    if meter.nvml_reader(device) is None:  # initialises NVML, where it is there
        return None
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(device.index if device.index is not None else 0)

    def read() -> int | None:
        try:
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except pynvml.NVMLError:
            return None
        mine = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory is not None]
        return mine[0] if len(mine) == 1 else None

    return read


class StepMemory(Observer):
    """The loop's memory report (meter.MemoryReport, in `report`), and as the options ask: each
    step's own peaks (--peaks-by-step) and the allocator's history over some steps only
    (--snapshot-steps). An observer of the loop (yoda_raw/hooks.py)."""

    def __init__(self, args, device):
        from yoda_raw import meter

        self.args, self.device = args, device
        self.report = meter.MemoryReport(show=False)  # reads the model and optimizer through the hooks
        self.steps: list[dict] = []  # one reading a step, with --peaks-by-step
        self.window = parse_steps(args.snapshot_steps) if args.snapshot_steps else None
        self.read_process_used = process_used_reader(device) if args.peaks_by_step else None

    def adapted(self, model) -> None:
        self.report.adapted(model)

    def loop_start(self, model, optimizer, loader, steps_per_epoch: int, total_steps: int) -> None:
        self.report.loop_start(model, optimizer, loader, steps_per_epoch, total_steps)

    def micro_batches(self, step, micro_batches, n_supervised) -> None:
        if self.window and step + 1 == self.window[0]:
            start_recording(self.args.snapshot_entries, self.args.snapshot_stacks)

    def updated(self, step, lr, optimizer) -> None:
        import torch

        from yoda_raw import meter

        if self.window and step + 1 == self.window[1]:
            stop_recording(self.args.snapshot)
        if not self.args.peaks_by_step:
            return
        torch.cuda.synchronize(self.device)
        reading = {"step": step + 1} | meter.memory_gib(self.device)
        process = self.read_process_used() if self.read_process_used else None
        reading["process_used_gib"] = round(process / common.GIB, 3) if process is not None else None
        self.steps.append(reading)
        meter.reset_peaks(self.device)

    def logged(self, record: dict) -> None:
        self.report.logged(record)


# --- what fits on a card -------------------------------------------------------------------------


def measure_cards(cfg, args) -> None:
    """For each card and tokens per row, the most rows that fit (see `probe`): one result each.
    The runs of this process share one line fit of device memory against tokens per step, which
    guesses where each search goes next."""
    import torch

    from yoda_raw import meter

    started = time.perf_counter()
    if meter.nvml_reader(torch.device("cuda", 0)) is None:
        common.fail("--cards measures with NVML: pip install nvidia-ml-py")
    idle_bytes = meter.nvml_used_bytes(torch.device("cuda", 0))  # before this process's CUDA context
    prior = tuple(float(x) for x in args.card_prior.split(",")) if args.card_prior else None
    # tokens -> rows that fit a card already measured (cards come smallest first): they fit larger ones.
    known = dict(tuple(int(n) for n in pair.split(":")) for pair in args.known_fit.split(",")) if args.known_fit else {}
    history: list[tuple[int, float]] = []  # (tokens per step, device used peak GiB) of every run that trained
    for card_gib in (float(c) for c in args.cards.split(",")):
        for tokens in (int(t) for t in args.card_tokens.split(",")):
            if args.time_budget_s is not None and time.perf_counter() - started > args.time_budget_s:
                print(f"card {card_gib:g} GiB x {tokens} tokens: not searched, time budget spent", flush=True)
                continue
            result = search_card(cfg, args, card_gib, tokens, history, prior, known.get(tokens, 0))
            known[tokens] = max(known.get(tokens, 0), result["card"]["rows_fit"])
            result["card"]["device_used_idle_gib"] = round(idle_bytes / common.GIB, 3) if idle_bytes else None
            common.write_result(result, args.json)
            print(card_line(result["card"]), flush=True)


def card_line(card: dict) -> str:
    """A card search's answer in one line, each probe as (rows, fits, NVML peak GiB).

    >>> card_line({"card_gib": 6.0, "tokens_per_row": 4096, "rows_fit": 3, "rows_not_fit": 5,
    ...            "probes": [{"rows": 3, "fits": True, "device_used_peak_gib": 5.481},
    ...                       {"rows": 5, "fits": False, "device_used_peak_gib": None}]})
    'card 6 GiB x 4096: fit 3, not 5, [(3, True, 5.481), (5, False, None)]'
    """
    probes = [(p["rows"], p["fits"], p["device_used_peak_gib"]) for p in card["probes"]]
    size, tokens = f"{card['card_gib']:g} GiB", card["tokens_per_row"]
    return f"card {size} x {tokens}: fit {card['rows_fit']}, not {card['rows_not_fit']}, {probes}"


def search_card(cfg, args, card_gib: float, tokens: int, history: list, prior, rows_known: int = 0) -> dict:
    """The most rows of `tokens` that fit on a card of `card_gib`, and the result of that run;
    `rows_known` fit a smaller card, and are not run again."""
    usable_gib = card_gib - args.margin_gib
    probes: list[dict] = []

    def fits(rows: int) -> bool:
        probes.append(reading := probe(cfg, args, card_gib, rows, tokens))
        peak = reading["device_used_peak_gib"]
        if reading["result"] is not None:
            history.append((rows * tokens, peak))
        # Each probe's reading in the log as it comes: a search that dies later still leaves them.
        print(
            f"probe {card_gib:g} GiB x {tokens}: {rows} rows, fits {reading['fits']}, NVML peak {peak} GiB", flush=True
        )
        return reading["fits"]

    def guess() -> int:
        a, b = common.line_fit(history) or prior or (PRIOR_A_GIB, PRIOR_B_GIB_PER_TOKEN)
        return max(1, math.floor((usable_gib - a) / b / tokens))

    rows_known = min(rows_known, args.max_rows)
    rows_fit, rows_not_fit = common.search_rows(fits, guess, args.max_rows, args.max_probes, lo=rows_known)
    best = next((p["result"] for p in probes if p["rows"] == rows_fit), None)
    not_run = {"pipeline": "yoda_raw", "config": {"rows": rows_fit, "tokens_per_row": tokens}}
    result = best or dict.fromkeys(common.RESULT_KEYS) | not_run  # none fits, or the smaller card's answer
    result["name"] = f"{args.name or 'card'}-{card_gib:g}gib-{tokens}"
    result["card"] = {
        "card_gib": card_gib,
        "margin_gib": args.margin_gib,
        "usable_gib": usable_gib,
        "precision": resolved_precision(cfg.precision),
        "tokens_per_row": tokens,
        "rows_fit": rows_fit,  # 0: not even one row
        "rows_known_to_fit": rows_known,  # fitted a smaller card in the same precision: not run again
        "rows_not_fit": rows_not_fit,  # the fewest rows measured not to fit; None: none tried
        "max_rows": args.max_rows,
        "probes": [{k: v for k, v in p.items() if k != "result"} for p in probes],
    }
    return result


def probe(cfg, args, card_gib: float, rows: int, tokens: int) -> dict:
    """One run of `rows` x `tokens` as on a card of `card_gib`. It fits when it trains and the
    most device memory NVML saw in use, loading included, stays within the card less the margin.

    On the H200, torch's allocator would cache freely where a small card makes it free its cache
    and retry; so it is capped (set_per_process_memory_fraction) at what the card would leave it:
    the card less the margin less what this process holds outside torch now (CUDA context,
    loaded kernels). The cap only shapes the allocator; the verdict is NVML's.
    """
    import torch

    from yoda_raw.errors import OutOfMemory

    usable_gib = card_gib - args.margin_gib
    torch.zeros(1, device="cuda")  # the CUDA context exists from here on, so the reading below counts it
    free, total = torch.cuda.mem_get_info()
    outside_gib = (total - free - torch.cuda.memory_reserved()) / common.GIB
    limit_gib = max(usable_gib - outside_gib, 0.1)
    torch.cuda.set_per_process_memory_fraction(limit_gib / (total / common.GIB))
    reading = {
        "rows": rows,
        "device_used_at_start_gib": round((total - free) / common.GIB, 3),
        "allocator_limit_gib": round(limit_gib, 3),
    }
    point = dataclasses.replace(cfg, batch_size=rows, max_length=tokens)
    try:
        result = measure(point, args, f"card-{card_gib:g}gib-{rows}x{tokens}", args.steps, watch_device=True)
    except OutOfMemory:  # the loop's own error for it (train.py), an answer here
        result = None
    except RuntimeError as err:  # out of memory elsewhere is an answer too; anything else is raised again
        if "out of memory" not in str(err) and "CUBLAS_STATUS_ALLOC_FAILED" not in str(err):
            raise
        result = None
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    if result is None:
        release()
        return reading | {"fits": False, "device_used_peak_gib": None, "error": "out of memory", "result": None}
    peak_gib = result["device_used_peak_gib"]
    return reading | {"fits": peak_gib <= usable_gib, "device_used_peak_gib": peak_gib, "result": result}


def resolved_precision(requested: str) -> str:
    """What --precision auto becomes on this device (the same decision the loop makes)."""
    import torch

    from yoda_raw.precision import choose_precision

    return choose_precision(requested, torch.device("cuda" if torch.cuda.is_available() else "cpu")).name


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
