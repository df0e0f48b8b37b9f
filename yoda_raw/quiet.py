"""The libraries' messages that are not about the user's run, switched off in one place.

yoda_raw/__init__.py imports this first, so run.py and every `python -m yoda_raw.*` command start
with it, before bitsandbytes, transformers or peft are imported. Each entry is narrow (the
library's logger or module and the message's own words), so every other warning, above all one
about the user's data, options or model, still shows:

- bitsandbytes, imported on a CPU with AVX512-BF16, asks the Hugging Face Hub for a faster 4-bit
  CPU kernel (`kernels-community/quantization-bitsandbytes`); the `kernels` package refuses it
  (its publisher is not on the Hub's trusted list, "Set trust_remote_code=True") or cannot reach
  the Hub, and bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community ..."
  and uses its own kernel. Under `accelerate launch` the logged exception reads like the run's
  own error. Nothing is wrong: dropped at bitsandbytes' logger.
- transformers 5 renamed gradient checkpointing to activation checkpointing, and its old names
  warn (FutureWarning) when peft or model.py calls them (model.py keeps the old name, which every
  transformers 5 release has): nothing a user can change.
- peft, saving the tiny preset's adapter, finds no config.json in the temporary folder the random
  model was built in (`yoda_raw_random_*`): true by design, and the adapter is complete.
"""

import logging
import warnings


class DropMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# The logger bitsandbytes/backends/cpu/ops.py logs to (getLogger(__name__)): a filter set now stays
# on it when bitsandbytes fetches the same logger at import.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_HUB_KERNEL = DropMessages("Failed to load CPU gemm_4bit_forward from kernels-community")


def install() -> None:
    """Set the filters (again: `warnings.catch_warnings` blocks, as pytest's, drop those set inside them)."""
    logging.getLogger(BNB_CPU_LOGGER).addFilter(BNB_HUB_KERNEL)  # a second add is a no-op
    warnings.filterwarnings(
        "ignore",
        message=r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated",
        category=FutureWarning,
        module=r"transformers\.modeling_utils",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"Could not find a config file in .*yoda_raw_random_",
        category=UserWarning,
        module=r"peft\.utils\.save_and_load",
    )


install()
