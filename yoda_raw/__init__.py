"""yoda_raw: QLoRA fine-tuning of Phi-3-mini into a Yoda-speak translator, every stage written out."""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    # Exit here, without unwinding: an exception raised in the middle of a library's import can set
    # that library's import machinery spinning, and nothing has been done that needs undoing.
    print("error: interrupted while starting; nothing was done", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if sys.argv[:1] == ["-m"]:
    # `python -m yoda_raw.COMMAND`: its libraries take seconds to import, and Ctrl-C meanwhile would
    # end in a traceback. One line instead, until the command runs (cli.run_command takes Ctrl-C back).
    signal.signal(signal.SIGINT, _interrupted_while_starting)

from yoda_raw import quiet  # noqa: E402, F401 - the libraries' noise that is not about the user's run
