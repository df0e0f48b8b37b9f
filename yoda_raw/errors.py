"""The one exception type of yoda_raw, and the one for a command stopped by a signal.

Anything a user can get wrong (a path, a field, an option) raises `YodaError` with a message that
names what is wrong and how to fix it. The command-line entry points print it as one line,
without a traceback (unless --debug), and exit with its `exit_code`: 2, or 128 + the signal's number
(130, 143) for a command stopped by SIGINT or SIGTERM (`Interrupted`; yoda_raw/cli.py).
"""

import signal


def reason(err: BaseException) -> str:
    """What went wrong, in a few words for an error line: the OS's own words for an OSError, else the
    error's first line, else its type's name."""
    text = str(err).strip()
    return getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)


class YodaError(Exception):
    """A problem with the user's input or setup, explained in one line."""

    exit_code = 2


class Interrupted(YodaError):
    """Stopped by SIGINT (Ctrl-C) or SIGTERM before the command finished; the message says what was
    kept. The exit status is 128 + the signal's number (130, 143), as shells report a process killed
    by it: a scheduler that preempts a run must not see success."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + signum


class OutOfMemory(YodaError):
    """Out of GPU memory in the loop, with nothing left to retry: what ran out, and what lowers it."""

    def __init__(self, batch_size: int, auto_batch_size: bool, num_processes: int, in_graph_capture: bool = False):
        if num_processes > 1:
            why = f"with {num_processes} processes --auto-batch-size cannot retry (the others are mid-step)"
        elif auto_batch_size:
            why = "--auto-batch-size found no smaller batch to retry with"
        else:
            why = "pass --auto-batch-size to retry with 0.9x the rows each time"
        where = f"; {GRAPH_CAPTURE}" if in_graph_capture else ""
        super().__init__(
            f"out of GPU memory at --batch-size {batch_size}{where}; {why}; lower --batch-size (with --grad-accum "
            "to keep the step size), or use --gradient-checkpointing, --offload-activations on, a shorter "
            "--max-length, or --optim paged_adamw_8bit"
        )


# Where the CUDA graph's capture (its second step) ran out of memory, the first step, the same batch
# run without the graph, fit: the graph's own memory (its pool, kept apart from the allocator's
# cache) was the difference.
GRAPH_CAPTURE = (
    "it ran out in the CUDA graph's capture, after the same batch fit without the graph: "
    "--cuda-graph off needs less memory, at some speed"
)


class NonFiniteLoss(YodaError):
    def __init__(self, bad_step: int, stopped_at: int | None = None):
        stopped_at = bad_step if stopped_at is None else stopped_at
        super().__init__(
            f"step {bad_step}: the loss or a gradient is NaN or infinite; its gradients were zeroed, and the run "
            f"stopped at step {stopped_at} without logging or saving anything after step {bad_step - 1} "
            "(checkpoints already saved are intact). Try a lower --lr, or --precision bf16/fp32 instead of fp16"
        )


class StopAtOnce(KeyboardInterrupt):
    """A signal that stops a command at once, without saving: SIGTERM outside training, or a second
    signal during it (yoda_raw/signals.py). A KeyboardInterrupt, so that everything unwinds as from
    Ctrl-C (temporary folders are removed on the way out); `signum` sets the exit status."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
