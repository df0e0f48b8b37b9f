"""What several test modules share: the option set of a plain tiny run, and reading an error line."""

# A short, plain run on a CPU: fp32, unquantized, nothing held out, no samples, the batch asked for,
# a loss logged every step, 4 steps.
PLAIN_RUN = {
    "quant": "none",
    "precision": "fp32",
    "eval_fraction": 0.0,
    "samples": False,
    "auto_batch_size": False,
    "logging_steps": 1,
    "max_steps": 4,
}


def last_error_line(capsys) -> str:
    """The last line a command wrote on stderr, checked to come without a traceback before it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err  # one line, not a traceback before it
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]
