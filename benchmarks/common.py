"""What bench_loop.py (ours) and bench_sft.py (TRL SFTTrainer) share: data, the random model,
and one function that turns per-step readings into the figures both report, so that the two
pipelines are measured by the same rules (benchmarks/README.md, "How it measures").
"""

import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
# A profiler trace's copies between the GPU and host memory (by their names): not the GPU's work
# but beside it (profile_step.py's idle time, lab/gap_waits.py's gaps).
HOST_COPY = r"^Memcpy (DtoH|HtoD)"

# Every measurement, from either pipeline, has these keys (None where a figure does not apply:
# memory on a CPU, MFU on a GPU without a known peak). Units are in the names.
RESULT_KEYS = (
    "name",
    "pipeline",
    "device",
    "config",
    "warmup_steps",
    "timed_steps",
    "step_s",
    "step_min_s",
    "step_max_s",
    "tokens_per_step",
    "tokens_per_s",
    "supervised_tokens_per_s",
    "flops_per_token",
    "model_tflops_per_s",
    "peak_tflops",
    "mfu",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "device_used_gib",
    "trainable_params",
    "total_params",
    "loss_first",
    "loss_last",
    "wall_s",
    "full_step_share",
)
# None on a CPU (the last three also on a GPU whose peak is unknown, unless --peak-tflops is given).
GPU_ONLY_KEYS = (
    "peak_allocated_gib",
    "peak_reserved_gib",
    "device_used_gib",
    "model_tflops_per_s",
    "peak_tflops",
    "mfu",
)

YODA_TOKENS_PER_CONVERSATION = 30.3  # Phi-3 tokenizer: 21,801 tokens / 720 conversations; the tiny BPE's is close


def data_dir() -> Path:
    """Folder with phi3-mini-4k-instruct/ and yoda_sentences/: $YODA_RAW_DATA or ../shared/data."""
    return Path(os.environ.get("YODA_RAW_DATA") or ROOT.parent / "shared" / "data")


def phi3_dir() -> Path:
    return data_dir() / "phi3-mini-4k-instruct"


def yoda_jsonl() -> Path:
    return data_dir() / "yoda_sentences" / "yoda_sentences.jsonl"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def copies_needed(n_conversations: int, tokens_per_step: int, steps: int) -> int:
    """How many times to repeat a data set so that `steps` full steps fit in its first epoch.

    Wrapped packing cuts the joined token stream into full rows, so every step is full as long as
    the epoch has more rows than the run uses. With 30.3 tokens a conversation (Phi-3's tokenizer;
    the tiny one makes more) and a 1.15x margin: 720 conversations hold ~21,800 tokens, so 16 x 64
    tokens for 11 steps needs 1 copy and 64 x 1024 tokens for 6 steps ceil(1.15 * 458,752 / 21,816)
    = 25. (Every copy is tokenized again, ~0.5 ms a conversation: keep the margin small.)
    """
    tokens = 1.15 * tokens_per_step * (steps + 1)
    return max(1, math.ceil(tokens / (n_conversations * YODA_TOKENS_PER_CONVERSATION)))


def repeat_jsonl(source: str | Path, copies: int, folder: str | Path) -> Path:
    """Write `copies` back-to-back copies of a .jsonl data set into `folder`; returns the path."""
    lines = Path(source).read_text(encoding="utf-8").splitlines(keepends=True)
    lines = [line if line.endswith("\n") else line + "\n" for line in lines if line.strip()]
    path = Path(folder) / f"repeated_{copies}x_{Path(source).name}"
    path.write_text("".join(lines * copies), encoding="utf-8")
    return path


def save_random_checkpoint(config_source: str, folder: str, seed: int = 42) -> None:
    """A Phi-3 (or any causal LM) with random weights, in bf16, saved where from_pretrained reads
    it: then every benchmark process loads the same weights the same way, and none spends time
    initialising and writing 7.6 GB of its own."""
    import torch
    import transformers

    from yoda_raw.model import random_model

    config = transformers.AutoConfig.from_pretrained(config_source)
    random_model(config, seed, torch.bfloat16).save_pretrained(folder)


def summarise(steps: list[dict], warmup: int) -> dict:
    """Per-step readings -> the timing figures of RESULT_KEYS (medians over the timed steps).

    Each reading has step_s, tokens, supervised_tokens. Tokens/s of a step is its tokens over its
    time; the medians are taken per figure, so tokens_per_s is the median step's throughput.

    >>> s = summarise([{"step_s": 2.0, "tokens": 100, "supervised_tokens": 50}] +
    ...               [{"step_s": t, "tokens": 100, "supervised_tokens": 50} for t in (0.5, 0.4, 0.6)], warmup=1)
    >>> s["step_s"], s["tokens_per_s"], s["supervised_tokens_per_s"], s["timed_steps"]
    (0.5, 200.0, 100.0, 3)
    """
    timed = steps[warmup:]
    if not timed:
        raise ValueError(f"no timed steps: {len(steps)} steps, {warmup} of them warm-up")
    seconds = [s["step_s"] for s in timed]
    return {
        "warmup_steps": warmup,
        "timed_steps": len(timed),
        "step_s": round(statistics.median(seconds), 4),
        "step_min_s": round(min(seconds), 4),
        "step_max_s": round(max(seconds), 4),
        "tokens_per_step": round(statistics.median(s["tokens"] for s in timed)),
        "tokens_per_s": round(statistics.median(s["tokens"] / s["step_s"] for s in timed), 1),
        "supervised_tokens_per_s": round(statistics.median(s["supervised_tokens"] / s["step_s"] for s in timed), 1),
    }


def full_step_share(timed: list[dict], full_tokens: int) -> float:
    """Share of the timed steps that were full batches of full rows (>= 99% of rows x tokens).
    Wrapped packing leaves one short row per packed stream, so a step now and then falls short;
    the medians hold as long as this stays above 0.5."""
    return round(sum(s["tokens"] >= 0.99 * full_tokens for s in timed) / len(timed), 3)


def flops_figures(tokens_per_s: float, trainable: int, total: int, peak_flops: float | None) -> dict:
    """Model FLOPs per token (LoRA-aware, yoda_raw/meter.py), achieved TFLOP/s and MFU against
    `peak_flops` (FLOP/s), None where no peak is known."""
    from yoda_raw import meter

    per_token = meter.flops_per_token(total - trainable, trainable)
    achieved = per_token * tokens_per_s
    return {
        "flops_per_token": per_token,
        "model_tflops_per_s": float(f"{achieved / 1e12:.4g}") if peak_flops else None,
        "peak_tflops": round(peak_flops / 1e12, 1) if peak_flops else None,
        "mfu": float(f"{achieved / peak_flops:.4g}") if peak_flops else None,  # a fraction, 4 significant digits
    }


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_flops_for(device_type: str, override_tflops: float | None) -> float | None:
    """--peak-tflops if given, else meter.PEAK_BF16_FLOPS for this GPU (None on a CPU)."""
    import torch

    from yoda_raw import meter

    if override_tflops:
        return override_tflops * 1e12
    return meter.peak_flops(torch.device(device_type))


def versions() -> dict:
    """Package versions, read from their metadata (importing nothing)."""
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "nvidia-ml-py"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_result(result: dict, path: str | None) -> None:
    """Append one measurement as a JSON line (so a crash later keeps the earlier ones)."""
    missing = [k for k in RESULT_KEYS if k not in result]
    if missing:
        raise KeyError(f"result lacks {missing}")
    line = json.dumps(result)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    print(f"RESULT {line}", flush=True)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def search_rows(
    fits, guess, max_rows: int, max_probes: int, lo: int = 0, within: float = 1.1
) -> tuple[int, int | None]:
    """The most rows that fit, by measuring: `fits(rows)` runs one configuration, `guess()` says
    where the answer may be (asked again before every run, as the runs teach it), `lo` rows are
    known to fit already (on a smaller card). Returns (most rows known to fit, 0 if none; fewest
    measured not to, None if none was too many); stops when those are within 10% or one row of
    each other, at max_rows, or after max_probes runs.

    >>> search_rows(lambda rows: rows <= 35, lambda: 30, max_rows=64, max_probes=6)
    (33, 37)

    30 fits; the guess says no more, so half as many again: 45 does not fit; halfway, 37 does not
    either; halfway again, 33 fits, and 37 is within 10% of it.
    """
    hi = None
    for _ in range(max_probes):
        if lo >= max_rows or hi == 1 or (hi is not None and hi <= max(lo + 1, math.ceil(lo * within))):
            break
        g = guess()
        if hi is None:  # nothing too many yet: up to the guess, or by half when the guess is stale
            rows = min(max(g if g > lo else math.ceil(lo * 1.5), math.ceil(lo * within)), max_rows)
        else:  # between the two: the guess where it lies inside, else halfway
            rows = g if lo < g < hi else (lo + hi) // 2
        if fits(rows):
            lo = rows
        else:
            hi = rows
    return lo, hi


def line_fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares line y = a + b x through the points; None until two x differ (or if b <= 0).

    >>> line_fit([(1000, 4.0), (3000, 6.0)])
    (3.0, 0.001)
    """
    xs = {x for x, _ in points}
    if len(xs) < 2:
        return None
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return (my - b * mx, b) if b > 0 else None
