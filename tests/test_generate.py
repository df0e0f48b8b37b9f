"""Generation: a tiny model that memorised its training pairs must give them back, batched or not.

The module fixture trains the tiny preset on 8 pairs until it knows them by heart (about 10 s on
two CPU cores); the tests then check decoding against pairs whose right answer is known.
"""

import io
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from accelerate.state import AcceleratorState
from conftest import assert_close_up_to_rounding

from yoda_raw import generate
from yoda_raw.config import TINY_DATASET
from yoda_raw.generate import end_token_ids, generate_ids, main, translate

N_PAIRS = 8
EPOCHS = 60
# Measured with tiny.py's initializer_range 0.1: 8/8 reproduced from 30 epochs on (4/8 after 20,
# 3/8 after 15); with Phi-3's 0.02 it took longer (6/8 after 60, 8/8 after 100). A decoding bug
# (no generation prompt, right padding, the prompt left in the output) gives 0/8.
MEMORISED_AT_LEAST = 0.75
UNSEEN = ["The Force is strong in you!", "Hi"]  # different lengths from the training sentences


def write_pairs(path: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(TINY_DATASET).read_text().splitlines()[:n]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_config):
    """Train the tiny preset (4-bit NF4 base, LoRA) on 8 pairs for 60 epochs of one step: one
    conversation per row, so training sees exactly the context generation sees."""
    from yoda_raw.train import main as train

    folder = tmp_path_factory.mktemp("memorised")
    pairs = write_pairs(folder / "pairs.jsonl", N_PAIRS)
    cfg = tiny_config(
        dataset=str(folder / "pairs.jsonl"),
        eval_fraction=0.0,
        packing="none",
        batch_size=N_PAIRS,
        epochs=EPOCHS,
        lr=1e-2,
        lora_r=16,
        lora_alpha=16,
        logging_steps=50,
        output_dir=str(folder / "adapter"),
    )
    AcceleratorState._reset_state(True)
    live = train(cfg)
    return {"model": live.model, "tokenizer": live.tokenizer, "pairs": pairs, "adapter": folder / "adapter"}


def test_memorised_pairs_come_back_exactly(memorised):
    """Greedy generation reproduces at least 75% of the training pairs exactly (measured: 8/8).
    Catches a prompt rendered differently from training (no generation prompt, an added BOS),
    the prompt or special tokens left in the output, or sampling where greedy was asked for."""
    model, tokenizer, pairs = memorised["model"], memorised["tokenizer"], memorised["pairs"]
    predictions = translate(model, tokenizer, [p["sentence"] for p in pairs])
    exact = sum(p == r["translation_extra"] for p, r in zip(predictions, pairs, strict=True)) / len(pairs)
    assert exact >= MEMORISED_AT_LEAST, list(zip(predictions, [r["translation_extra"] for r in pairs], strict=True))


def test_left_padded_batch_equals_one_by_one(memorised):
    """One batch of prompts of different lengths gives what one sentence at a time gives.
    Catches right padding (short prompts would continue after pad tokens), a missing attention
    mask, and cutting the prompt off at each row's own length instead of the batch width."""
    model, tokenizer = memorised["model"], memorised["tokenizer"]
    sentences = [p["sentence"] for p in memorised["pairs"]] + UNSEEN
    assert len({len(generate.prompt_ids(tokenizer, s)) for s in sentences}) > 1  # padding really happens
    batched = generate_ids(model, tokenizer, sentences, max_new_tokens=24, batch_size=len(sentences))
    single = [generate_ids(model, tokenizer, [s], max_new_tokens=24)[0] for s in sentences]
    assert batched == single


def test_stops_at_the_first_end_token_and_keeps_only_new_tokens(memorised):
    """Each answer is the reference's tokens followed by exactly one end token, Phi-3's <|end|>.
    Catches end tokens taken from eos alone (generation would run on past <|end|> to
    <|endoftext|>), text after the end token, and the prompt's ids left in front of the answer."""
    model, tokenizer, pairs = memorised["model"], memorised["tokenizer"], memorised["pairs"]
    ends = set(tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"]))
    rows = generate_ids(model, tokenizer, [p["sentence"] for p in pairs], max_new_tokens=64)
    matched = 0
    for row, pair in zip(rows, pairs, strict=True):
        assert len(row) < 64 and row[-1] in ends, "generation ran to max_new_tokens instead of stopping"
        assert not ends & set(row[:-1]), f"an end token inside the answer: {tokenizer.convert_ids_to_tokens(row)}"
        if tokenizer.decode(row[:-1]) == pair["translation_extra"]:
            matched += 1
            assert row[-1] == tokenizer.convert_tokens_to_ids("<|end|>")  # the turn closes as trained
    assert matched >= MEMORISED_AT_LEAST * len(pairs)


def test_end_tokens_of_the_tiny_tokenizer(memorised):
    """<|endoftext|> (eos), <|assistant|> (opens a turn) and <|end|> (closes one): 3, 4, 10.
    Catches a derivation that misses the template's markers or returns text instead of ids."""
    tokenizer = memorised["tokenizer"]
    expected = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"])
    assert end_token_ids(tokenizer) == sorted(expected) == [3, 4, 10]


def test_end_tokens_of_phi3_are_32000_32001_32007(phi3_path):
    """Generation stops on Phi-3's <|endoftext|> 32000, <|assistant|> 32001 and <|end|> 32007, with
    or without its generation config (a random-init base has none). Catches a derivation that only
    works on the tiny tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(phi3_path))
    assert end_token_ids(tokenizer) == [32000, 32001, 32007]
    generation_config = transformers.GenerationConfig.from_pretrained(str(phi3_path))
    assert end_token_ids(tokenizer, generation_config) == [32000, 32001, 32007]


def test_generation_leaves_the_model_ready_to_train(memorised):
    """After translate the model is back in train mode with the KV cache still off. Catches a
    model left in eval mode (dropout silently off for the rest of training) or use_cache left on."""
    model, tokenizer = memorised["model"], memorised["tokenizer"]
    model.train()
    translate(model, tokenizer, UNSEEN, max_new_tokens=4)
    assert model.training and model.config.use_cache is False


# --- the command line ---------------------------------------------------------------------------


def test_cli_translates_arguments(memorised, capsys):
    """One printed line per sentence, equal to translate()'s answers, nothing else on stdout.
    Catches the prompt echoed, or logging mixed into the translations."""
    model, tokenizer = memorised["model"], memorised["tokenizer"]
    expected = translate(model, tokenizer, UNSEEN)
    assert main(["--adapter", str(memorised["adapter"]), *UNSEEN]) == 0
    assert capsys.readouterr().out.splitlines() == expected


def test_cli_reads_stdin_one_line_per_line(memorised, capsys, monkeypatch):
    """Input line i is answered on output line i; a blank line gives a blank line.
    Catches blank lines dropped (every later answer shifts up a line) and multi-line answers."""
    model, tokenizer = memorised["model"], memorised["tokenizer"]
    sentence = memorised["pairs"][0]["sentence"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{sentence}\n\n{UNSEEN[0]}\n"))
    assert main(["--adapter", str(memorised["adapter"]), "--batch-size", "2"]) == 0
    expected = translate(model, tokenizer, [sentence, UNSEEN[0]])
    assert capsys.readouterr().out.splitlines() == [expected[0], "", expected[1]]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing folder", "no such folder"),
        ("not an adapter", "not an adapter"),
        ("empty stdin", "no sentences"),
    ],
)
def test_cli_bad_input_is_one_error_line(case, message, memorised, tmp_path, capsys, monkeypatch):
    """error: ... on stderr, exit status 2, no traceback. Catches a YodaError escaping main."""
    folders = {"missing folder": tmp_path / "nope", "not an adapter": tmp_path, "empty stdin": memorised["adapter"]}
    adapter = folders[case]
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["--adapter", str(adapter)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_merged_model_computes_what_base_plus_adapter_computes(memorised, tmp_path):
    """--merge writes a plain transformers model with the same logits as base + adapter (1e-5),
    and a generation config that stops at <|end|>. Catches merging into the 4-bit weights
    (measured: logits off by ~0.2, the update rounded to NF4 levels)."""
    out = tmp_path / "merged"
    assert main(["--adapter", str(memorised["adapter"]), "--merge", str(out)]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    model, tokenizer, _ = generate.load_for_inference(memorised["adapter"])
    ids = torch.tensor([generate.prompt_ids(tokenizer, memorised["pairs"][0]["sentence"])])  # (1, T)
    with torch.no_grad():
        # W + BA merged against x W^T + (x A^T) B^T: the same fp32 sums grouped otherwise, equal up to
        # the tiny forward's rounding (conftest), 7.2e-5 of the logits' size; NF4-rounded merges are ~0.2 off.
        assert_close_up_to_rounding(merged(input_ids=ids).logits, model(input_ids=ids).logits, name="logits")
    assert set(end_token_ids(tokenizer)) <= set(merged.generation_config.eos_token_id)


# --- generation must not break training (bitsandbytes on AVX512-BF16 CPUs) ----------------------


def lora_grads_after(tiny_config, action, seed: int = 3) -> dict[str, torch.Tensor]:
    """LoRA gradients of one training forward/backward on a fresh 4-bit tiny model, after `action(model)`.
    `tiny_config` is the conftest fixture."""
    from yoda_raw.chat import load_tokenizer, tokenize_conversation
    from yoda_raw.model import add_lora, load_base_model
    from yoda_raw.packing import Collator
    from yoda_raw.precision import choose_precision
    from yoda_raw.train import token_loss_sum

    cfg = tiny_config(quant="nf4", lora_dropout=0.0)
    tokenizer = load_tokenizer("tiny")
    cpu = torch.device("cpu")
    model = add_lora(load_base_model(cfg, choose_precision("fp32", cpu), cpu, len(tokenizer)), cfg)
    torch.manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter matter
            param.data.normal_(std=0.1)
    action(model, tokenizer)
    model.train()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi, I say."}]
    batch = Collator(tokenizer.pad_token_id)([tokenize_conversation(tokenizer, messages)])
    token_loss_sum(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_training_after_generation_gets_the_same_gradients(tiny_config):
    """LoRA gradients after a generation equal those of an identical model that never generated.
    Catches bitsandbytes' AVX512-BF16 repacking of 4-bit weights in an eval-mode forward (the
    `support_avx512bf16_for_cpu = False` line in model.py): without it the gradients are wrong by
    ~76% on CPUs with AVX512-BF16. (On other CPUs and on GPUs this test cannot fail that way.)"""

    def generate_once(model, tokenizer):
        translate(model, tokenizer, UNSEEN, max_new_tokens=3)

    untouched = lora_grads_after(tiny_config, lambda model, tokenizer: None)
    after = lora_grads_after(tiny_config, generate_once)
    assert untouched.keys() == after.keys() and len(untouched) > 0
    # The same step twice: within fp32 rounding of the tiny model's step (conftest), 7.2e-5 of each
    # tensor's size, where the repacked weights are ~76% off.
    for name in untouched:
        assert_close_up_to_rounding(after[name], untouched[name], name=name)


# --- the system prompt --------------------------------------------------------------------------

SYSTEM_PROMPT = "Speak like Yoda."


def test_generation_prompt_is_the_training_rendering_up_to_the_answer(tiny_tokenizer):
    """With --system-prompt, generation starts from exactly the ids that preceded the answer in
    training: the system message, the user turn and the assistant header. Catches a prompt built
    without the system message (a context the model never trained on)."""
    from yoda_raw.chat import IGNORE, tokenize_conversation
    from yoda_raw.data import with_system_prompt

    pair = [{"role": "user", "content": "The stars are bright."}, {"role": "assistant", "content": "Bright, they are."}]
    example = tokenize_conversation(tiny_tokenizer, with_system_prompt(pair, SYSTEM_PROMPT))
    answer_start = next(t for t, label in enumerate(example["labels"]) if label != IGNORE)
    prompt = generate.prompt_ids(tiny_tokenizer, "The stars are bright.", SYSTEM_PROMPT)
    assert prompt == example["input_ids"][:answer_start]
    assert len(prompt) > len(generate.prompt_ids(tiny_tokenizer, "The stars are bright."))  # the system turn is in


def test_cli_prompts_carry_the_runs_system_prompt(tiny_config, tmp_path, monkeypatch, capsys):
    """run_config.json records --system-prompt, and generate and evaluate of that adapter render
    every prompt with it, as training did, without being told again."""
    from yoda_raw import evaluate
    from yoda_raw.train import main as train

    write_pairs(tmp_path / "pairs.jsonl", 10)
    out = tmp_path / "adapter"
    cfg = tiny_config(
        dataset=str(tmp_path / "pairs.jsonl"),
        system_prompt=SYSTEM_PROMPT,
        eval_fraction=0.3,
        max_steps=2,
        samples=False,
        output_dir=str(out),
    )
    AcceleratorState._reset_state(True)
    train(cfg)
    assert json.loads((out / "run_config.json").read_text())["system_prompt"] == SYSTEM_PROMPT

    seen = []
    real_prompt_ids = generate.prompt_ids

    def spy(tokenizer, sentence, system_prompt=None):
        seen.append(system_prompt)
        return real_prompt_ids(tokenizer, sentence, system_prompt)

    monkeypatch.setattr(generate, "prompt_ids", spy)
    assert main(["--adapter", str(out), "--max-new-tokens", "2", "Hi"]) == 0
    assert evaluate.main(["--adapter", str(out), "--max-new-tokens", "2"]) == 0
    assert len(seen) == 1 + 2 * 3  # one sentence; 3 held-out ones, base and adapter
    assert set(seen) == {SYSTEM_PROMPT}


def test_a_run_config_without_its_model_is_refused_not_taken_for_the_default(tmp_path):
    """Catches an adapter whose run_config.json lost its `model` key being loaded onto the default
    base (Phi-3-mini from the Hub): offline a misleading network error, online an adapter on weights
    it was never trained on. One line naming the file and the key instead."""
    from safetensors.torch import save_file

    from yoda_raw.checkpoint import ADAPTER_FILE
    from yoda_raw.errors import YodaError

    save_file({"w": torch.zeros(1)}, str(tmp_path / ADAPTER_FILE))
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "run_config.json").write_text(json.dumps({"preset": "tiny", "init": "random"}))
    with pytest.raises(YodaError, match=r"run_config.json has no 'model'"):
        generate.read_run_config(tmp_path)
