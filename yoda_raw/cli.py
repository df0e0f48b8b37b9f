"""What every command of yoda_raw does with a mistake in its input: one line, and a non-zero exit status.

`run.py`, `python -m yoda_raw.generate`, `python -m yoda_raw.evaluate`, `python -m yoda_raw.inspect`
and `python -m yoda_raw.trace` each hand their work to `run_command`. A `YodaError` (a path, a field,
an option the user can fix) is printed as `error: ...` on stderr, without a traceback, and the
command exits with the error's `exit_code`: 2, or 128 + the signal's number (130, 143) for a command
stopped by SIGINT or SIGTERM (`Interrupted`, whose message says what was kept). A Ctrl-C that stops
a command at once (a KeyboardInterrupt: while loading, or a second one mid-step) is one line too, and
exit status 130. With `--debug` on the command line the traceback is shown instead. Any other
exception is a bug in yoda_raw and keeps its traceback. Under torchrun (several processes) only rank 0
prints the line: every process meets the same error, and one line is enough. The other processes
wait a few seconds before printing a mistake (status 2): torchrun ends them as soon as rank 0 exits,
and a rank that fails first would otherwise take rank 0 down before it had said anything.
"""

import argparse
import errno
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from yoda_raw.errors import StopAtOnce, YodaError

# Under torchrun, how long a process other than rank 0 waits before printing its mistake itself (see above).
OTHER_RANKS_WAIT_S = 5.0


def one_line_on_ctrl_c_while_starting() -> None:
    """A command's libraries take seconds to import, and Ctrl-C meanwhile would end in a traceback:
    one line and exit status 130 instead, until `run_command` takes Ctrl-C back. Called first by
    run.py and, for `python -m yoda_raw.COMMAND`, by yoda_raw/__init__.py. A SIGTERM then (a
    scheduler's) says so too, where it would end the process without a word."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    signal.signal(signal.SIGTERM, _interrupted_while_starting)


def _interrupted_while_starting(signum, frame):
    # Exit here, without unwinding: an exception raised in the middle of a library's import can set
    # that library's import machinery spinning, and nothing has been done that needs undoing.
    print("error: interrupted while starting; nothing was done", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def run_command(
    command: Callable[[list[str]], int], argv: list[str] | None = None, interrupted: str = "interrupted"
) -> int:
    """`command(argv)`'s exit status, or the error's exit status after printing a YodaError as one line
    (130 after a Ctrl-C that stopped it at once).

    `interrupted`: the line printed (after `error: `) when Ctrl-C stops the command at once.
    """
    argv = sys.argv[1:] if argv is None else argv
    # Ctrl-C is a KeyboardInterrupt again (see below), and SIGTERM (a scheduler, `kill`) outside training
    # unwinds like it, so temporary folders go; training puts its own handlers in place
    # (yoda_raw/signals.py). The main thread alone may set them.
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = signal.signal(signal.SIGTERM, _stop_at_once) if main_thread else None
    if previous is _interrupted_while_starting:  # starting is over: afterwards, SIGTERM's default
        previous = signal.SIG_DFL
    restore = signal.default_int_handler, previous if previous is not None else signal.SIG_DFL

    def handlers(sigint, sigterm) -> None:
        if main_thread:
            signal.signal(signal.SIGINT, sigint)
            signal.signal(signal.SIGTERM, sigterm)

    # Once the command has stopped, what is left is to say how. A second Ctrl-C or SIGTERM then (a
    # stop's "saved out/checkpoint-N; continue with --resume ..." line still to come) would end the
    # process without that line, so they are ignored until it is out.
    try:
        try:
            outcome = _run(command, argv, interrupted)
            if not isinstance(outcome, int):
                handlers(signal.SIG_IGN, signal.SIG_IGN)
        except KeyboardInterrupt as err:
            # A second signal that landed while the first stop was being turned into its line: it
            # stops at once (checkpoints saved before, the first stop's among them, are whole).
            handlers(signal.SIG_IGN, signal.SIG_IGN)
            if "--debug" in argv:
                raise
            outcome = _stopped_at_once(err, interrupted)
    except BaseException:
        handlers(*restore)  # a bug's traceback, or --debug's
        raise
    if isinstance(outcome, int):
        handlers(*restore)
        return outcome
    line, status = outcome
    # Free the failed run first, outside the except block (which holds the traceback): its progress
    # bar redraws as it closes, and the error is to be the last line. (Frames in the traceback refer
    # to each other: only the collector frees them.)
    gc.collect()
    if os.environ.get("RANK", "0") != "0":  # under torchrun, every process has the same error: rank 0 says it
        if status != 2:
            handlers(*restore)
            return status  # a stop the processes agreed on
        # A mistake: rank 0 meets it too, says it and exits, and torchrun then ends this process. Had
        # this one exited first, torchrun would have ended rank 0 before its line (no line at all).
        # Still here after the wait: rank 0 did not meet it (a mistake on this machine only), say it.
        handlers(signal.SIG_DFL, signal.SIG_DFL)  # torchrun's SIGTERM (or Ctrl-C) ends the wait, quietly
        time.sleep(OTHER_RANKS_WAIT_S)
    print(line, file=sys.stderr)
    handlers(*restore)
    return status


def _run(command: Callable[[list[str]], int], argv: list[str], interrupted: str) -> int | tuple[str, int]:
    """`command(argv)`'s exit status, or (the line to print, the exit status) for a failure the user
    should see as one line."""
    try:
        status = command(argv)
        sys.stdout.flush()  # a closed pipe or a full disk shows here, in the handlers below, not at exit
        return status
    except YodaError as err:
        if "--debug" in argv:
            raise
        return f"error: {err}", err.exit_code
    except BrokenPipeError:
        # `inspect | head`: the reader has gone, which is no error. Further writes (Python's own flush
        # at exit) go nowhere; the status is a shell's for a writer stopped by SIGPIPE.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or "--debug" in argv:
            raise
        # A full disk (or quota) wherever it strikes outside the writes that say so themselves (stdout, a log).
        where = f" writing {err.filename}" if err.filename else ""
        return f"error: {err.strerror.lower()}{where}; free some space and run again", 2
    except KeyboardInterrupt as err:
        if "--debug" in argv:
            raise
        return _stopped_at_once(err, interrupted)


def _stopped_at_once(err: KeyboardInterrupt, interrupted: str) -> tuple[str, int]:
    """The line and the shell's status of a signal that stopped a command at once. A SIGTERM is a
    KeyboardInterrupt too (errors.StopAtOnce), and says which signal it was."""
    return f"error: {interrupted}", 128 + getattr(err, "signum", signal.SIGINT)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose mistakes (an unknown option, a bad value) are one line `error: ...`,
    exit status 2, as run.py's are, not the usage text and then the error."""

    def error(self, message: str):
        raise YodaError(f"{message}; see `{self.prog} --help`")


def _stop_at_once(signum, frame):
    raise StopAtOnce(signum)
