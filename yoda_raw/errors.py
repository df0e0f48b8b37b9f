"""The one exception type of yoda_raw, and the one for a command stopped by a signal.

Anything a user can get wrong (a path, a field, an option) raises `YodaError` with a message that
names what is wrong and how to fix it. The command-line entry points print it as one line,
without a traceback (unless --debug), and exit with its `exit_code`: 2, or 128 + the signal's number
(130, 143) for a command stopped by SIGINT or SIGTERM (`Interrupted`; yoda_raw/cli.py).
"""

import signal


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
