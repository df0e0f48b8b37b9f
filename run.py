"""Fine-tune Phi-3-mini into a Yoda-speak translator with QLoRA: `accelerate launch run.py`.

With no options this runs the tutorial's recipe (yoda_raw/config.py has every default).
`--preset smol` teaches a real 135M-parameter model Yoda speak on a CPU in minutes; `--preset tiny`
runs a tiny random model on a CPU in a minute or two. `--config FILE.yaml` reads options from a
file; options on the command line win over the file, which wins over the preset.
"""

import gc
import sys
import time

STARTED = time.perf_counter()  # before the heavy imports: the run's time line counts them

from yoda_raw.cli import one_line_on_ctrl_c_while_starting, run_command  # noqa: E402 - light, before torch

if __name__ == "__main__":  # (not when tests import this file)
    one_line_on_ctrl_c_while_starting()  # Ctrl-C in the first seconds, while the libraries load: one line

import torch  # noqa: E402

from yoda_raw.config import parse_config  # noqa: E402
from yoda_raw.errors import YodaError  # noqa: E402
from yoda_raw.plot import write_plot  # noqa: E402

# Ctrl-C while loading, or a second Ctrl-C / SIGTERM mid-step (the first one saves a checkpoint).
INTERRUPTED = (
    "interrupted; stopped at once without saving (checkpoints saved before are whole): "
    "continue from the newest with --resume OUTPUT_DIR/checkpoint-N, or start over with --overwrite"
)


def main(argv: list[str]) -> int:
    """A mistake in the options or data is one line `error: ...` and exit status 2 (yoda_raw/cli.py)."""
    return run_command(train_command, argv, interrupted=INTERRUPTED)


def train_command(argv: list[str]) -> int:
    cfg = parse_config(argv, description=__doc__.splitlines()[0])
    from yoda_raw.train import main as train  # heavy imports after the options are known good

    try:
        result = train(cfg)
    except torch.cuda.OutOfMemoryError as err:
        raise YodaError(
            "out of GPU memory; lower it with --auto-batch-size (on by default), a smaller --batch-size "
            "(with --grad-accum to keep the step size), --gradient-checkpointing, a shorter --max-length, "
            "or --optim paged_adamw_8bit"
        ) from err
    if result.is_main_process:
        print(f"saved the adapter to {result.output_dir} after {result.fit.steps} steps")
        print(time_line(result, time.perf_counter() - STARTED))
        write_plot(result.output_dir)  # metrics.png: loss, tokens/s and memory over steps (yoda_raw/plot.py)
    return 0


def time_line(result, total_s: float) -> str:
    """Where the run's wall time went, e.g. `time: 53 s: 15 s importing, 0 s starting, 3 s loading,
    35 s training (20 s of it to step 10, warm-up included), 0 s saving`: the total
    from this script's first import; importing is the libraries' imports (and reading the options);
    starting is the accelerator with CUDA's start, and the checks before any data; the first logging
    window holds the compiling and the capture. (Python's own start, and `accelerate launch`'s, come
    before.)"""
    parts = [f"{total_s - sum(result.seconds.values()):.0f} s importing"]
    for stage, seconds in result.seconds.items():
        part = f"{seconds:.0f} s {stage}"
        if stage == "training" and result.fit.log:
            first = result.fit.log[0]
            part += f" ({first['elapsed_s']:.0f} s of it to step {first['step']}, warm-up included)"
        parts.append(part)
    return f"time: {total_s:.0f} s: " + ", ".join(parts)


if __name__ == "__main__":
    status = main(sys.argv[1:])
    # Everything is written and closed by now. Frozen, the objects torch and transformers made are
    # left out of Python's last garbage collections at exit, which would otherwise walk millions of
    # them for a second or more after the last line. The operating system takes the memory back.
    gc.freeze()
    sys.exit(status)
