"""What every command of yoda_raw does with a mistake in its input: one line, exit status 2.

`run.py`, `python -m yoda_raw.generate`, `python -m yoda_raw.evaluate`, `python -m yoda_raw.inspect`
and `python -m yoda_raw.trace` each hand their work to `run_command`. A `YodaError` (a path, a field,
an option the user can fix) is printed as `error: ...` on stderr, without a traceback, and the
command exits with status 2; with `--debug` on the command line the traceback is shown instead.
Any other exception is a bug in yoda_raw and keeps its traceback.
"""

import sys
from collections.abc import Callable

from yoda_raw.errors import YodaError


def run_command(command: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """`command(argv)`'s exit status, or 2 after printing a YodaError as one line."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return command(argv)
    except YodaError as err:
        if "--debug" in argv:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
