"""python -m yoda_raw.trace: every stage appears, with the shapes the options imply, and its step is the loop's."""

import contextlib
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from yoda_raw import tiny, trace
from yoda_raw.config import parse_config
from yoda_raw.train import main as train

REPO_ROOT = Path(__file__).resolve().parent.parent

# Options that move every shape away from the preset's, so that a shape the trace hard-coded (or
# took from the wrong place) shows. r 16 makes some LoRA tensors big enough for 8-bit optimizer state;
# dropout makes step 1's gradients depend on the random state, so a trace that drew random numbers
# the loop does not draw would log another grad norm than the loop.
OPTIONS = [
    "--lora-dropout",
    "0.1",
    "--batch-size",
    "3",
    "--max-length",
    "40",
    "--grad-accum",
    "2",
    "--lora-r",
    "16",
    "--lora-alpha",
    "8",
]

STAGES = [
    "1. setup  [config.parse_config, settle.settle, train.make_accelerator]",
    "2. one conversation -> ids and labels  [data.load_conversations, chat.tokenize_conversation]",
    "3. rows, and the order they come in  [packing.build_rows, packing.EpochSampler]",
    "4. the base model, its weights in 4 bits  [model.load_base_model]",
    "5. LoRA on the frozen base  [model.add_lora, fast.apply]",
    "6. the optimizer  [optim.build_optimizer, fast.optimizer, accelerator.prepare]",
    "7. the micro-batches of step 1  [train.step_batches, packing.Collator, loss.supervised_count]",
    "8. forward and backward  [",  # then the step object the loop called: train.EagerStep on a CPU
    "9. clip and update  [accelerator.clip_grad_norm_, optimizer.step, optimizer.zero_grad]",
]


def run_trace(argv: list[str]) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert trace.main(argv) == 0
    return stdout.getvalue()


@pytest.fixture(scope="module")
def traced():
    """The trace's output with OPTIONS (run once for the tests below), and the config it ran."""
    return run_trace(OPTIONS), parse_config(["--preset", "tiny", *OPTIONS])


def step_1(out: str) -> tuple[float, float, float]:
    """(loss, grad_norm, lr) from the trace's last line."""
    return tuple(map(float, re.search(r"step 1: loss ([\d.]+), grad_norm ([\d.]+), lr ([\d.e-]+)", out).groups()))


def loops_step_1(cfg, output_dir: Path) -> dict:
    """What run.py with these options logs for step 1."""
    train(dataclasses.replace(cfg, max_steps=1, logging_steps=1, samples=False, output_dir=str(output_dir)))
    return json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[0])


def stage(out: str, number: int) -> str:
    """The text of stage `number`, up to the next heading."""
    return out.split(f"\n== {number}. ")[1].split("\n== ")[0]


def test_every_stage_in_order(traced):
    out, _ = traced
    positions = [out.index(f"== {heading}") for heading in STAGES]
    assert positions == sorted(positions)
    assert "== 8. forward and backward  [train.EagerStep] ==" in out  # the step the eager loop calls


def test_a_change_to_the_loop_shows_in_the_trace(traced, monkeypatch):
    """The trace watches the loop; it does not copy it. A change to what the loop's step computes
    (here its loss, doubled) reaches the trace's output with no change to trace.py. Catches a trace
    that computes step 1 itself."""
    from yoda_raw import train as train_module

    real = train_module.token_loss_sum
    monkeypatch.setattr(train_module, "token_loss_sum", lambda model, batch, *chunked: 2 * real(model, batch, *chunked))
    out, _ = traced
    doubled = run_trace(OPTIONS)
    # Step 1's loss comes before any update, from the same seeds: exactly twice the loss. The bound
    # is the log record's rounding to 6 decimals, once in each run and doubled in one of them.
    assert step_1(doubled)[0] == pytest.approx(2 * step_1(out)[0], abs=4e-6)


def test_conversation_ids_and_labels(traced):
    out, _ = traced
    text = stage(out, 2)
    table = [line.split() for line in text.splitlines() if re.match(r"\s+\d+\s+\d+\s+'", line)]
    n_ids, n_supervised = map(int, re.search(r"(\d+) ids, (\d+) supervised", text).groups())
    assert len(table) == n_ids
    assert sum(row[-1] != "(masked)" for row in table) == n_supervised > 0
    assert all(row[-2:] == ["-100", "(masked)"] or row[-1] == row[1] for row in table)  # a label is its own id
    assert table[0][2] == "'<|user|>'" and table[0][-1] == "(masked)"  # the user's turn is not trained on
    assert table[-1][2] == "'<|endoftext|>'" and table[-1][-1] == table[-1][1]  # the end of text is


def test_rows_and_batch_shapes_follow_the_options(traced):
    out, cfg = traced
    assert f"cut every {cfg.max_length} (--packing wrapped)" in stage(out, 3)
    assert re.search(rf"row \d+, the first the loader draws: {cfg.max_length} tokens", stage(out, 3))
    batches = stage(out, 7)
    assert f"step 1 = {cfg.grad_accum} micro-batch(es)" in batches
    # Wrapped rows are all max_length long but the last, so every micro-batch is (batch_size, max_length).
    shape = f"({cfg.batch_size}, {cfg.max_length})"
    for key in ("input_ids", "attention_mask", "labels"):
        assert len(re.findall(rf"  {key}\s+{re.escape(shape)}\s+torch.int64", batches)) == cfg.grad_accum
    per_batch = [int(n) for n in re.findall(r"(\d+) supervised next-token targets", batches)]
    assert f"divided by its {sum(per_batch)} supervised tokens" in batches


def test_4bit_weights_read_off_the_quant_state(traced):
    out, cfg = traced
    text = stage(out, 4)
    shape = tiny.model_config(tiny.VOCAB_SIZE)
    out_features, in_features = 2 * shape.intermediate_size, shape.hidden_size  # gate_up_proj, the largest
    assert f"model.layers.0.mlp.gate_up_proj (the largest layer LoRA will wrap): {out_features} x {in_features}" in text
    n = out_features * in_features
    assert f"Params4bit torch.uint8 ({n // 2}, 1): {n // 2:,} bytes" in text
    blocksize = int(re.search(r"blocksize\s+(\d+)", text).group(1))
    n_blocks = n // blocksize
    assert f"absmax     torch.uint8 ({n_blocks},), {n_blocks:,} bytes: double quantization" in text
    second = re.search(r"absmax torch.float32 \((\d+),\), one per (\d+) blocks", text)
    assert int(second.group(1)) == -(-n_blocks // int(second.group(2)))
    assert f"dequantize_4bit -> ({out_features}, {in_features}) torch.float32" in text
    # The hand computation from the stored byte lands on what bitsandbytes dequantized.
    first = float(re.search(r"weight\[0, :6\] = \[([-\d.]+),", text).group(1))
    by_hand = float(re.search(r"= ([-\d.]+) = weight\[0, 0\]", text).group(1))
    assert by_hand == pytest.approx(first, abs=1e-4)  # both printed to 4 decimals: +-5e-5 each


def test_lora_matrices(traced):
    out, cfg = traced
    text = stage(out, 5)
    shape = tiny.model_config(tiny.VOCAB_SIZE)
    out_features, in_features = 2 * shape.intermediate_size, shape.hidden_size  # gate_up_proj
    assert f"lora_A.default.weight ({cfg.lora_r}, {in_features}) = (r, in), torch.float32" in text
    assert f"lora_B.default.weight ({out_features}, {cfg.lora_r}) = (out, r), torch.float32, all zero" in text
    assert f"lora_alpha / r = {cfg.lora_alpha} / {cfg.lora_r} = {cfg.lora_alpha / cfg.lora_r:g}" in text
    low, high, bound = map(float, re.search(r"\[([-\d.]+), ([-\d.]+)\].*1/sqrt\(in\) = ([\d.]+)", text).groups())
    assert -bound <= low < 0 < high <= bound


def test_logits_gradients_and_optimizer_state(traced):
    out, cfg = traced
    forward = stage(out, 8)
    vocab = tiny.VOCAB_SIZE  # the tiny model's vocabulary is its tokenizer's
    b, t = cfg.batch_size, cfg.max_length
    assert forward.count(f"logits ({b}, {t}, {vocab}) = (B, T, V) torch.float32") == cfg.grad_accum
    assert forward.count(f"as float32 ({b}, {t - 1}, {vocab})") == cfg.grad_accum
    config = tiny.model_config(vocab)
    targets = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # the default on Phi-3: every linear but the head
    n_trainable = config.num_hidden_layers * len(targets) * 2  # A and B
    assert f"{n_trainable} of the {n_trainable} trainable tensors have one, 0 of the" in forward
    norms = dict(re.findall(r"(lora_[AB])\.default\.weight\s+\([\d, ]+\)\s+grad norm ([\d.e-]+)", forward))
    assert float(norms["lora_A"]) == 0 and float(norms["lora_B"]) > 0  # B = 0 at step 1: no gradient reaches A

    update = stage(out, 9)
    state_rows = re.findall(r"\.weight\s+([\d,]+)\s+(8|32)-bit\s+([\d,]+) B\s+not paged", update)
    assert len(state_rows) == len(targets) * 2  # the first block's tensors
    for elements, bits, size in state_rows:
        elements, size = int(elements.replace(",", "")), int(size.replace(",", ""))
        # bitsandbytes: 8-bit moments (plus one fp32 scale per 256) from 4096 elements, else fp32 moments
        expected = ("8", 2 * elements + 2 * 4 * -(-elements // 256)) if elements >= 4096 else ("32", 8 * elements)
        assert (bits, size) == expected
    assert any(bits == "8" for _, bits, _ in state_rows) and any(bits == "32" for _, bits, _ in state_rows)
    assert "lora_A moved by at most 0\n" in update


def test_step_is_the_loops_step_1(traced, tmp_path):
    """The trace cannot drift from the loop: run.py with the same options logs the same step 1."""
    out, cfg = traced
    loss, grad_norm, lr = step_1(out)
    logged = loops_step_1(cfg, tmp_path)
    # The same functions on the same batch: the same floats, each side rounded to 6 decimals
    # (+-5e-7); a trace that drifted from the loop (other rows, other seed) is off in the 2nd decimal.
    assert logged["loss"] == pytest.approx(loss, abs=2e-6)
    assert logged["grad_norm"] == pytest.approx(grad_norm, abs=2e-6)
    assert logged["lr"] == lr


def test_a_system_prompt_is_traced_as_it_is_trained(tmp_path):
    """--system-prompt reaches the traced conversation and rows as it reaches the loop's: the step is
    still the loop's step 1. Catches a trace that reads the data without the run's system prompt."""
    options = [*OPTIONS, "--system-prompt", "Translate into Yoda speak."]
    out = run_trace(options)
    assert "Translate into Yoda speak." in stage(out, 2)
    loss, grad_norm, _ = step_1(out)
    logged = loops_step_1(parse_config(["--preset", "tiny", *options]), tmp_path)
    assert logged["loss"] == pytest.approx(loss, abs=2e-6)
    assert logged["grad_norm"] == pytest.approx(grad_norm, abs=2e-6)


def test_unquantized_base_and_torch_adamw(capsys):
    assert trace.main(["--quant", "none", "--optim", "adamw", "--max-length", "32"]) == 0
    out = capsys.readouterr().out
    assert "not quantized (--quant none)" in stage(out, 4) and "tensors Params4bit" not in out
    assert "--optim adamw: torch.optim.adamw.AdamW" in stage(out, 6)
    n = tiny.model_config(tiny.VOCAB_SIZE).num_hidden_layers * 4 * 2  # the preset's 4 LoRA targets, A and B
    assert (
        "exp_avg float32" in stage(out, 9) and f"all {n} trainable tensors: 0 with 8-bit state, {n} with 32-bit" in out
    )


@pytest.mark.slow  # a process that imports the libraries and fails: ten seconds on 2 cores
def test_bad_option_exits_2_with_one_line():
    """Run as readers run it: exit status 2, one line on stderr naming the command, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "yoda_raw.trace", "--batch-size", "many"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    # The last line is ours; bitsandbytes may log a line of its own on import (CPUs with AVX512-BF16).
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: argument --batch_size/--batch-size: invalid int value: 'many'")
    assert last.endswith("; see `python -m yoda_raw.trace --help`")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run `pytest -m gpu` on a GPU machine")
def test_on_cuda_memory_after_every_stage_and_the_loops_step_1(tmp_path):
    """On one GPU the loop records a CUDA graph (--cuda-graph auto) and trains in bf16; the trace follows."""
    out = run_trace(OPTIONS)
    assert out.count("\n[cuda: ") == len(STAGES)  # one memory line closes every stage
    assert "[fast.graphs.GraphStep]" in out  # the CUDA graph's step
    assert "set_to_none=False" in stage(out, 9)
    loss, grad_norm, _ = step_1(out)
    logged = loops_step_1(parse_config(["--preset", "tiny", *OPTIONS]), tmp_path)
    # Same functions, same seed, same device; rel 1e-3 leaves room for GPU kernels (atomic adds in
    # backward) that sum in another order from one run to the next.
    assert logged["loss"] == pytest.approx(loss, rel=1e-3)
    assert logged["grad_norm"] == pytest.approx(grad_norm, rel=1e-3)
