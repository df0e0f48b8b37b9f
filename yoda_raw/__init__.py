"""yoda_raw: QLoRA fine-tuning of Phi-3-mini into a Yoda-speak translator, every stage written out."""

import sys

if sys.argv[:1] == ["-m"]:  # `python -m yoda_raw.COMMAND`, while the command's module loads
    from yoda_raw.cli import one_line_on_ctrl_c_while_starting

    one_line_on_ctrl_c_while_starting()

from yoda_raw import quiet  # noqa: E402, F401 - the libraries' noise that is not about the user's run
