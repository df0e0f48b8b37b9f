"""The one exception type of yoda_raw.

Anything a user can get wrong (a path, a field, an option) raises `YodaError` with a message that
names what is wrong and how to fix it. The command-line entry points print it as one line,
without a traceback (unless --debug), and exit with its `exit_code`: 2, or 128 + the signal's number
for a run stopped by SIGINT or SIGTERM (train.Interrupted).
"""


class YodaError(Exception):
    """A problem with the user's input or setup, explained in one line."""

    exit_code = 2
