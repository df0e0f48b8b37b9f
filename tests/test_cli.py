"""run.py's command line: the option spellings users type, presets, YAML files and precedence."""

import signal
import subprocess
import sys

import pytest
import torch

from run import parse_config
from yoda_raw.config import PRESETS, TINY, Config
from yoda_raw.errors import Interrupted, YodaError

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

# The spellings issue 3 promises, each with a value where it takes one.
SPELLINGS = [
    ["--preset", "tiny"],
    ["--model", "m"],
    ["--tokenizer", "t"],
    ["--dataset", "d.jsonl"],
    ["--init", "random"],
    ["--quant", "none"],
    ["--precision", "fp32"],
    ["--optim", "adamw"],
    ["--train-on", "all"],
    ["--packing", "none"],
    ["--max-length", "32"],
    ["--eval-fraction", "0"],
    ["--batch-size", "4"],
    ["--grad-accum", "2"],
    ["--auto-batch-size"],
    ["--no-auto-batch-size"],
    ["--gradient-checkpointing"],
    ["--no-gradient-checkpointing"],
    ["--epochs", "2"],
    ["--max-steps", "5"],
    ["--lr", "1e-3"],
    ["--weight-decay", "0.1"],
    ["--warmup-steps", "3"],
    ["--lora-r", "4"],
    ["--lora-alpha", "8"],
    ["--lora-dropout", "0.1"],
    ["--lora_dropout", "0.1"],
    ["--shuffle"],
    ["--no-shuffle"],
    ["--seed", "1"],
    ["--logging-steps", "2"],
    ["--save-steps", "3"],
    ["--resume", "ck"],
    ["--output-dir", "o"],
    ["--overwrite"],
    ["--report-to", "tensorboard"],
    ["--push-to-hub", "me/yoda"],
]


@pytest.mark.parametrize("argv", SPELLINGS, ids=lambda a: a[0])
def test_every_documented_spelling_parses(argv):
    """A renamed or missing option breaks every script and tutorial that uses it."""
    assert isinstance(parse_config(argv), Config)


def test_no_arguments_is_the_tutorial():
    cfg = parse_config([])
    assert (cfg.model, cfg.dataset, cfg.epochs, cfg.batch_size, cfg.max_length, cfg.lr) == (
        "microsoft/Phi-3-mini-4k-instruct",
        "dvgodoy/yoda_sentences",
        10,
        16,
        64,
        3e-4,
    )
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.optim) == (8, 16, 0.05, "paged_adamw_8bit")


def test_command_line_beats_yaml_beats_preset(tmp_path):
    """Precedence bug: a preset or file value silently overriding what the user typed."""
    config = tmp_path / "run.yaml"
    config.write_text("lr: 0.5\nbatch-size: 3\n")
    cfg = parse_config(["--preset", "tiny", "--config", str(config), "--batch-size", "2"])
    assert cfg.model == TINY and cfg.epochs == PRESETS["tiny"]["epochs"]  # from the preset
    assert cfg.lr == 0.5  # the file beats the preset
    assert cfg.batch_size == 2  # the command line beats the file


def test_yaml_on_and_off_are_the_options_on_and_off(tmp_path):
    """YAML reads an unquoted `on` or `off` as true or false; for the on/off options (--cuda-graph,
    --fp8-matmuls, ...) they mean "on" and "off", as on the command line. Elsewhere true stays an
    error that names the choices."""
    config = tmp_path / "run.yaml"
    config.write_text("cuda_graph: on\ncompile_layers: off\nfp8_matmuls: on\n")
    cfg = parse_config(["--preset", "tiny", "--config", str(config)])
    assert (cfg.cuda_graph, cfg.compile_layers, cfg.fp8_matmuls) == ("on", "off", "on")
    config.write_text("quant: on\n")
    with pytest.raises(YodaError, match=r"^--quant must be one of nf4, none, auto, got True$"):
        parse_config(["--preset", "tiny", "--config", str(config)])


def test_unknown_yaml_key_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.5\n")
    with pytest.raises(YodaError, match="unknown option.*learning_rate"):
        parse_config(["--config", str(config)])


def test_help_lists_options():
    """--help crashed once on a '%' in a help text (argparse formats help with %)."""
    done = subprocess.run([sys.executable, "run.py", "--help"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--lora-dropout" in done.stdout and "--no-gradient-checkpointing" in done.stdout


def test_report_to_tensorboard_without_the_package_says_how_to_get_it():
    """Catches accelerate's own late failure (or a silently dropped tracker) when tensorboard is missing."""
    from accelerate.utils import is_tensorboard_available

    from yoda_raw.precision import choose_precision
    from yoda_raw.train import make_accelerator

    if is_tensorboard_available():
        pytest.skip("tensorboard is installed here")
    with pytest.raises(YodaError, match="pip install tensorboard"):
        make_accelerator(Config(report_to="tensorboard"), choose_precision("fp32", torch.device("cpu")))


def _mistakes(tmp_path):
    """One input mistake for each command of yoda_raw: (command's main, its argv)."""
    import run
    from yoda_raw import evaluate, generate, inspect, trace

    missing = str(tmp_path / "missing")
    return {
        "run.py": (run.main, ["--preset", "no-such-preset"]),
        "generate": (generate.main, ["--adapter", missing, "some sentence"]),
        "evaluate": (evaluate.main, ["--adapter", missing]),
        "inspect": (inspect.main, ["--tokenizer", "tiny", "--dataset", missing + ".jsonl"]),
        "trace": (trace.main, ["--preset", "no-such-preset"]),
    }


@pytest.mark.parametrize("command", ["run.py", "generate", "evaluate", "inspect", "trace"])
def test_every_command_reports_a_mistake_as_one_line_and_debug_shows_the_traceback(command, tmp_path, capsys):
    """All five commands share cli.run_command: a YodaError is `error: ...` and status 2; --debug re-raises."""
    main, argv = _mistakes(tmp_path)[command]
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    with pytest.raises(YodaError):
        main([*argv, "--debug"])


@pytest.mark.parametrize("command", ["run.py", "generate", "evaluate", "inspect", "trace", "fetch"])
def test_every_command_says_an_unknown_option_in_one_line(command, capsys):
    """Catches argparse's usage text and its own `error:` line (three lines and more) from a
    command whose parser is not cli.ArgumentParser: one line naming the option, and status 2."""
    import run
    from yoda_raw import evaluate, fetch, generate, inspect, trace

    main = {"run.py": run.main, "generate": generate.main, "evaluate": evaluate.main, "inspect": inspect.main,
            "trace": trace.main, "fetch": fetch.main}[command]  # fmt: skip
    required = {"generate": ["--adapter", "x"], "evaluate": ["--adapter", "x"], "fetch": ["smol"]}.get(command, [])
    assert main([*required, "--no-such-option", "1"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and "--no-such-option" in stderr and stderr.count("\n") == 1, stderr


@pytest.mark.parametrize(
    "raised, status",
    [
        (KeyboardInterrupt(), 130),
        (Interrupted("interrupted during the evaluation"), 130),
        (Interrupted("interrupted: SIGTERM", signal.SIGTERM), 143),
    ],
)
def test_a_signal_is_one_line_and_its_shell_status(raised, status, capsys):
    """Catches a Ctrl-C (or the Interrupted error that says what was kept) ending in a traceback or
    status 2: every command exits as a shell reports the signal (128 + SIGINT, 128 + SIGTERM);
    --debug re-raises."""
    from yoda_raw.cli import run_command

    def command(argv):
        raise raised

    assert run_command(command, ["--some-option"]) == status
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: interrupted") and stderr.count("\n") == 1, stderr
    with pytest.raises(type(raised)):
        run_command(command, ["--debug"])


def test_a_second_signal_while_the_first_stop_is_made_into_its_line_is_one_line_too(capsys):
    """A second SIGTERM can land between a stop's raise and its line (here: as the stop's message is
    read, where a signal's handler raises). One line and the signal's status, not a traceback:
    the hostile re-run of issue 30 met a StopAtOnce traceback once in eleven double SIGTERMs."""
    from yoda_raw.cli import run_command
    from yoda_raw.errors import StopAtOnce

    class StoppedAndSaved(Interrupted):
        def __str__(self):
            raise StopAtOnce(signal.SIGTERM)  # what the signal handler raises, at that moment

    def command(argv):
        raise StoppedAndSaved("stopped after step 1 and saved out/checkpoint-1", signal.SIGTERM)

    assert run_command(command, [], interrupted="interrupted; stopped at once") == 143
    assert capsys.readouterr().err == "error: interrupted; stopped at once\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_under_torchrun_a_mistake_is_said_once_also_when_rank_0_never_says_it(monkeypatch, capsys):
    """Catches `accelerate launch --multi_gpu --num_processes 2 run.py --bogus 1` printing nothing:
    rank 1 exited 2 first without a line, and torchrun ended rank 0 before it printed. Other ranks
    now wait (for torchrun to end them once rank 0 has said it), then say it themselves; a stop the
    processes agreed on stays rank 0's to say."""
    from yoda_raw import cli

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(cli, "OTHER_RANKS_WAIT_S", 0.0)

    def mistake(argv):
        raise YodaError("unrecognized arguments: --bogus 1")

    def stopped(argv):
        raise Interrupted("SIGTERM: stopped after step 2", signal.SIGTERM)

    assert cli.run_command(mistake, []) == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --bogus 1\n"
    assert cli.run_command(stopped, []) == 143
    assert capsys.readouterr().err == ""


def test_a_second_signal_while_a_stop_is_being_reported_does_not_lose_its_line(tmp_path):
    """Catches a second SIGTERM (or Ctrl-C) that came while a stopped run freed its memory, before
    its line "stopped after step N and saved ...; continue with --resume ...": the process was
    killed by it (status -15, no line at all), though its checkpoint was whole. Now the line comes,
    with the first signal's status. In another process: the signals are real."""
    script = tmp_path / "second_signal.py"
    script.write_text(
        "import gc, os, signal, sys\n"
        "from yoda_raw import cli\n"
        "from yoda_raw.errors import Interrupted\n"
        "def command(argv):\n"
        "    raise Interrupted('SIGTERM: stopped after step 1 and saved out/checkpoint-1', signal.SIGTERM)\n"
        "real = gc.collect\n"
        "def collect_after_two_more_signals(*args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(*args)\n"
        "gc.collect = collect_after_two_more_signals\n"
        "sys.exit(cli.run_command(command, []))\n"
    )
    done = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 128 + signal.SIGTERM, (done.returncode, done.stderr)
    assert done.stderr == "error: SIGTERM: stopped after step 1 and saved out/checkpoint-1\n", done.stderr
