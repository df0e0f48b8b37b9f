"""What every command of yoda_raw does with a mistake in its input: one line, and a non-zero exit status.

`run.py`, `python -m yoda_raw.generate`, `python -m yoda_raw.evaluate`, `python -m yoda_raw.inspect`
and `python -m yoda_raw.trace` each hand their work to `run_command`. A `YodaError` (a path, a field,
an option the user can fix) is printed as `error: ...` on stderr, without a traceback, and the
command exits with the error's `exit_code`: 2, or 128 + the signal's number (130, 143) for a command
stopped by SIGINT or SIGTERM (`Interrupted`, whose message says what was kept). A Ctrl-C that stops
a command at once (a KeyboardInterrupt: while loading, or a second one mid-step) is one line too, and
exit status 130. With `--debug` on the command line the traceback is shown instead. Any other
exception is a bug in yoda_raw and keeps its traceback. Under torchrun (several processes) only rank 0
prints the line: every process meets the same error, and one line is enough.
"""

import gc
import os
import signal
import sys
from collections.abc import Callable

from yoda_raw.errors import YodaError


def run_command(
    command: Callable[[list[str]], int], argv: list[str] | None = None, interrupted: str = "interrupted"
) -> int:
    """`command(argv)`'s exit status, or the error's exit status after printing a YodaError as one line
    (130 after a Ctrl-C that stopped it at once).

    `interrupted`: the line printed (after `error: `) when Ctrl-C stops the command at once.
    """
    argv = sys.argv[1:] if argv is None else argv
    try:
        return command(argv)
    except YodaError as err:
        if "--debug" in argv:
            raise
        failure = f"error: {err}", err.exit_code
    except KeyboardInterrupt as err:
        if "--debug" in argv:
            raise
        # A second SIGTERM mid-step is a KeyboardInterrupt too (signals.StopAtOnce), and says which signal.
        failure = f"error: {interrupted}", 128 + getattr(err, "signum", signal.SIGINT)
    # Free the failed run first, outside the except block (which holds the traceback): its progress
    # bar redraws as it closes, and the error is to be the last line. (Frames in the traceback refer
    # to each other: only the collector frees them.)
    gc.collect()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, every process has the same error: rank 0 says it
        print(failure[0], file=sys.stderr)
    return failure[1]
