"""Option sets that several test modules run the tiny preset with (tiny_config's first argument)."""

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
