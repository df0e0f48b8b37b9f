"""A run's pictures: loss, tokens/s and memory over steps, drawn from its metrics.jsonl.

    python -m yoda_raw.plot OUTPUT_DIR            # or any metrics.jsonl: writes metrics.png beside it

run.py draws it at the end of every run (`write_plot`). Three panels share the step axis:
- loss: the training loss of each logging window (a mean over its steps' supervised tokens), and
  the held-out loss where the run evaluated (a point at the step it was measured);
- tokens/s: all tokens the model processed and the supervised ones, per second of step time;
- memory: the peaks torch's allocator saw and what the GPU's driver reports in use (GiB). A CPU
  run logs no device memory, and the panel says so.

matplotlib draws off-screen (its Agg backend: no display needed) and is imported only here, when a
plot is drawn, so the other commands do not pay for its import.
"""

import argparse
import json
import sys
from pathlib import Path

from yoda_raw.cli import run_command
from yoda_raw.errors import YodaError
from yoda_raw.errors import reason as error_reason

METRICS_FILE = "metrics.jsonl"  # yoda_raw.output.METRICS_FILE, repeated: output imports accelerate
PLOT_FILE = "metrics.png"

MEMORY_KEYS = (
    ("peak_allocated_gib", "peak allocated (torch's tensors)"),
    ("peak_reserved_gib", "peak reserved (torch's allocator)"),
    ("device_used_gib", "device used (driver, NVML)"),
)


def metrics_path(path: str | Path) -> Path:
    """The metrics.jsonl a user named: the file itself, or the one in a run's output folder."""
    path = Path(path)
    return path / METRICS_FILE if path.is_dir() else path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, in order; a missing, empty or damaged file is one YodaError."""
    path = metrics_path(path)
    if not path.is_file():
        raise YodaError(f"{path} not found: give a run's output folder or its metrics.jsonl")
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise YodaError(f"{path} line {number} is not a metrics record (JSON with a step): is the file damaged?")
        records.append(record)
    if not any("loss" in r for r in records):
        raise YodaError(f"{path} has no logged step yet: a run writes one every --logging-steps steps")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that carry `key`, e.g. `series(records, "loss")`."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [s for s, _ in points], [v for _, v in points]


def draw(records: list[dict], png: Path, title: str) -> Path:
    """Draw the three panels into `png` (written whole or not at all: a temporary file, renamed)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no window: works on a server without a display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (loss_ax, speed_ax, memory_ax) = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    steps, loss = series(records, "loss")
    loss_ax.plot(steps, loss, ".-", label="training (mean of each logging window)")
    eval_steps, eval_loss = series(records, "eval_loss")
    if eval_steps:
        loss_ax.plot(eval_steps, eval_loss, "o", markersize=8, label="held-out")
    loss_ax.set_ylabel("loss (nats per token)")
    loss_ax.legend(fontsize=8)

    for key, label in (("tokens_per_s", "all tokens"), ("supervised_tokens_per_s", "supervised tokens")):
        x, y = series(records, key)
        if x:
            speed_ax.plot(x, y, ".-", label=label)
    speed_ax.set_ylabel("tokens / s")
    speed_ax.set_ylim(bottom=0)
    speed_ax.legend(fontsize=8)

    drawn = False
    for key, label in MEMORY_KEYS:
        x, y = series(records, key)
        if x:
            memory_ax.plot(x, y, ".-", label=label)
            drawn = True
    if drawn:
        memory_ax.set_ylim(bottom=0)
        memory_ax.legend(fontsize=8, loc="lower right")
    else:
        memory_ax.set_yticks([])
        memory_ax.text(0.5, 0.5, "no device memory logged (a CPU run logs none)", ha="center", va="center",
                       transform=memory_ax.transAxes, color="grey")  # fmt: skip
    memory_ax.set_ylabel("memory (GiB)")
    memory_ax.set_xlabel("optimizer step")
    memory_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole numbers
    for ax in (loss_ax, speed_ax, memory_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.07, top=0.94, hspace=0.1)  # fixed: cheaper than tight_layout
    partial = png.with_name(f".{png.name}.partial")
    fig.savefig(partial, dpi=100, format="png")
    plt.close(fig)
    partial.replace(png)
    return png


def plot_metrics(path: str | Path) -> Path:
    """Read a metrics.jsonl (or a run's folder) and write metrics.png beside it; the PNG's path."""
    source = metrics_path(path)
    records = read_metrics(source)
    return draw(records, source.with_name(PLOT_FILE), title(source))


def title(source: Path) -> str:
    """The run's folder and, where run_config.json is beside it, its model: `out: tiny, 30 steps`."""
    folder = source.parent.resolve().name
    try:
        config = json.loads(source.with_name("run_config.json").read_text())
        return f"{folder}: {config['model']}"
    except (OSError, ValueError, KeyError, TypeError):
        return folder


def write_plot(out_dir: str | Path) -> Path | None:
    """The end of a run: draw OUT_DIR/metrics.png. Never fails the run: if anything goes wrong (no
    matplotlib, a full disk, no logged step) it says so in one line on stderr and returns None."""
    try:
        png = plot_metrics(out_dir)
    except Exception as err:  # noqa: BLE001 - the adapter is saved; a missing picture must not lose the run
        reason = error_reason(err)
        print(f"plot: no metrics.png ({reason}); the run is saved", file=sys.stderr)
        return None
    print(f"plotted loss, tokens/s and memory in {png}")
    return png


def plot_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m yoda_raw.plot", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a run's output folder, or a metrics.jsonl; metrics.png goes beside it")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise YodaError("matplotlib is not installed: pip install matplotlib") from None
    print(f"wrote {plot_metrics(args.path)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(plot_command, argv)


if __name__ == "__main__":
    sys.exit(main())
