"""Fine-tune Phi-3-mini into a Yoda-speak translator with QLoRA: `accelerate launch run.py`.

With no options this runs the tutorial's recipe (yoda_raw/config.py has every default).
`--preset tiny` runs a tiny model on a CPU in a minute or two. `--config FILE.yaml` reads options
from a file; options on the command line win over the file, which wins over the preset.
"""

import argparse
import sys

import torch
import yaml
from transformers import HfArgumentParser

from yoda_raw.config import PRESETS, Config
from yoda_raw.errors import YodaError


class Parser(HfArgumentParser):
    """HfArgumentParser whose errors (unknown option, bad value) are one line, not usage + error."""

    def error(self, message: str):
        raise YodaError(f"{message}; see `python run.py --help`")


def parse_config(argv: list[str]) -> Config:
    """Command line -> Config. Precedence: command line > --config file > --preset > defaults."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="tutorial")
    first.add_argument("--config", default=None)
    known, rest = first.parse_known_args(argv)
    if known.preset not in PRESETS:
        raise YodaError(f"--preset must be one of {', '.join(PRESETS)}, got {known.preset!r}")
    defaults = {"preset": known.preset, **PRESETS[known.preset]}
    if known.config:
        defaults |= _read_yaml(known.config)
    parser = Parser(Config, prog="run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML file of options (keys are field names).")
    known_fields = {action.dest for action in parser._actions}
    unknown = sorted(set(defaults) - known_fields)
    if unknown:
        raise YodaError(f"{known.config}: unknown option(s) {', '.join(unknown)}; see `python run.py --help`")
    parser.set_defaults(**defaults)
    namespace = parser.parse_args(argv)
    del namespace.config
    return Config(**vars(namespace))


def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as err:
        raise YodaError(f"--config {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise YodaError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise YodaError(f"--config {path}: expected a mapping of option: value, got {type(values).__name__}")
    return {key.replace("-", "_"): value for key, value in values.items()}


def main(argv: list[str]) -> int:
    debug = "--debug" in argv
    try:
        cfg = parse_config(argv)
        from yoda_raw.train import main as train  # heavy imports after the options are known good

        summary = train(cfg)
    except torch.cuda.OutOfMemoryError:
        if debug:
            raise
        print(
            "error: out of GPU memory; lower it with --auto-batch-size (on by default), a smaller --batch-size "
            "(with --grad-accum to keep the step size), --gradient-checkpointing, a shorter --max-length, "
            "or --optim paged_adamw_8bit",
            file=sys.stderr,
        )
        return 2
    except YodaError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary["is_main_process"]:
        print(f"saved the adapter to {summary['output_dir']} after {summary['steps']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
