"""Evaluation: numbers checked against hand-built oracles, and the held-out split of the run."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_up_to_rounding, rounding_tolerance
from peft import LoraConfig, get_peft_model

from yoda_raw import evaluate
from yoda_raw.config import PRESETS, TINY_DATASET, Config
from yoda_raw.data import load_conversations, split_conversations
from yoda_raw.errors import YodaError
from yoda_raw.generate import SAMPLE_SENTENCE

CONVERSATIONS = [  # answers of different lengths, so a mean of per-conversation means differs
    [{"role": "user", "content": SAMPLE_SENTENCE}, {"role": "assistant", "content": "Strong in you, the Force is."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi."}],
    [{"role": "user", "content": "Go."}, {"role": "assistant", "content": "Go, you must. Yes, hrrmm, go you will."}],
]


def with_lora(model):
    """peft LoRA on the tiny model, B random so that the adapter changes the outputs."""
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"]))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)
    return model


def oracle_loss(model, tokenizer, conversations) -> tuple[float, int]:
    """By hand: each conversation alone (no padding); supervised = every token after the
    generation prompt (answer, <|end|>, <|endoftext|>); sum of F.cross_entropy / count."""
    total, count = 0.0, 0
    for messages in conversations:
        render = tokenizer.apply_chat_template
        full = render(messages, tokenize=True, return_dict=False)
        prompt = render(messages[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert full[: len(prompt)] == prompt
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0]  # (T, V)
        positions = range(len(prompt), len(full))  # token t is predicted by the logits at t - 1
        total += F.cross_entropy(
            logits[[t - 1 for t in positions]], torch.tensor([full[t] for t in positions]), reduction="sum"
        ).item()
        count += len(positions)
    return total, count


def test_loss_is_cross_entropy_over_supervised_tokens(tiny_model, tiny_tokenizer):
    """Sum and count equal the hand-built oracle, batched (right-padded) or not. Catches a mean of
    per-batch means, an off-by-one shift, the prompt or padding counted as supervised, and
    padding attended to."""
    expected_sum, expected_count = oracle_loss(tiny_model, tiny_tokenizer, CONVERSATIONS)
    for batch_size in (1, 3):
        loss_sum, count = evaluate.supervised_loss(tiny_model, tiny_tokenizer, CONVERSATIONS, batch_size=batch_size)
        assert count == expected_count
        # Padded batches against one conversation at a time: other shapes, other orders of the same
        # sums, equal up to fp32 rounding of the tiny forward (conftest); a padded or prompt token
        # counted, or a shift off by one, moves the sum by whole tokens' losses (~6 each).
        assert loss_sum == pytest.approx(expected_sum, rel=0, abs=rounding_tolerance(expected_sum))


def test_exact_match_chrf_bleu_on_a_hand_made_case():
    """Identical texts: exact match 1, chrF 100, BLEU 100; one of two wrong: exact match 0.5.
    Catches references passed to sacrebleu as the wrong nesting (it wants a list of reference
    streams) and exact match that counts surrounding whitespace."""
    references = ["Strong in you, the Force is.", "Much to learn, you still have."]
    same = evaluate.text_metrics([r + " " for r in references], references)
    # sacrebleu computes in Python floats (fp64, u = 1.1e-16) over a few hundred operations: approx's
    # default (1e-6 relative) is far above that, far below one wrong character's effect on chrF.
    assert same == {"exact_match": 1.0, "chrf": pytest.approx(100.0), "bleu": pytest.approx(100.0)}
    half = evaluate.text_metrics([references[0], "Nothing alike here at all, friend."], references)
    assert half["exact_match"] == 0.5 and 0 < half["chrf"] < 100 and 0 < half["bleu"] < 100


def test_without_sacrebleu_the_error_says_how_to_install_it(monkeypatch):
    """Catches an ImportError traceback instead of a one-line YodaError naming the extra."""
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # `import sacrebleu` now raises ImportError
    with pytest.raises(YodaError, match=r"pip install -e \.\[eval\]"):
        evaluate.text_metrics(["a"], ["a"])
    without = evaluate.text_metrics(["a"], ["a"], require_sacrebleu=False)
    assert without == {"exact_match": 1.0, "chrf": None, "bleu": None}


def test_base_column_is_the_model_without_its_adapter(tiny_model, tiny_tokenizer):
    """compare()'s base loss is the plain model's; its adapter loss is the oracle with LoRA on.
    Catches the adapter left on for the base column (both columns equal)."""
    base_sum, count = oracle_loss(tiny_model, tiny_tokenizer, CONVERSATIONS)
    model = with_lora(tiny_model)
    adapted_sum, _ = oracle_loss(model, tiny_tokenizer, CONVERSATIONS)
    results = evaluate.compare(model, tiny_tokenizer, CONVERSATIONS, max_new_tokens=4)
    # Batched against one conversation at a time: equal up to fp32 rounding of the tiny forward
    # (conftest, 7.2e-5 relative; exp keeps a relative error as it is); the adapter (B ~ N(0, 0.5))
    # moves the loss by far more than that: a base column with the adapter left on fails both.
    rel = rounding_tolerance(1.0)
    assert results["base"]["loss"] == pytest.approx(base_sum / count, rel=rel)
    assert results["adapter"]["loss"] == pytest.approx(adapted_sum / count, rel=rel)
    assert abs(base_sum - adapted_sum) / count > 1e-2  # the adapter does change the loss, > 100 x rel
    assert results["adapter"]["perplexity"] == pytest.approx(torch.tensor(adapted_sum / count).exp().item(), rel=rel)
    table = evaluate.markdown_table(results)
    assert table.splitlines()[0] == "| metric | base | adapter |" and len(table.splitlines()) == 2 + 5


# --- the command line and the end of a run ------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 3-step tiny run on 10 pairs with 30% held out: an adapter folder as run.py leaves it."""
    from accelerate.state import AcceleratorState

    from yoda_raw.train import main as train

    folder = tmp_path_factory.mktemp("short_run")
    lines = Path(TINY_DATASET).read_text().splitlines()[:10]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    cfg = Config(
        **{
            "preset": "tiny",
            **PRESETS["tiny"],
            "dataset": str(folder / "pairs.jsonl"),
            "eval_fraction": 0.3,
            "max_steps": 3,
            "output_dir": str(folder / "adapter"),
        }
    )
    AcceleratorState._reset_state(True)
    live = train(cfg)
    return {
        "cfg": cfg,
        "adapter": folder / "adapter",
        "model": live.model,
        "tokenizer": live.tokenizer,
        "held_out": live.held_out,
    }


def test_a_refusal_leaves_no_empty_output_folder(short_run, tmp_path):
    """A --max-new-tokens longer than the model's context is refused before any pass, and the
    --output-dir it had made for the results is gone again. Catches an empty folder left behind."""
    out = tmp_path / "scores"
    args = ["--adapter", str(short_run["adapter"]), "--output-dir", str(out), "--max-new-tokens", "100000"]
    assert evaluate.main(args) == 2
    assert not out.exists()


def test_cli_scores_the_split_training_held_out(short_run, tmp_path, capsys):
    """eval.json scores exactly the 3 conversations the run held out (same seed and fraction),
    base and adapter; eval.md holds the table. Catches scoring the training split, or a split
    drawn with another seed or fraction than the run's."""
    args = ["--adapter", str(short_run["adapter"]), "--output-dir", str(tmp_path), "--max-new-tokens", "8"]
    assert evaluate.main(args) == 0
    record = json.loads((tmp_path / "eval.json").read_text())
    cfg = short_run["cfg"]
    train, held_out = split_conversations(load_conversations(cfg.dataset), cfg.eval_fraction, cfg.seed)
    scored = [t["sentence"] for t in record["adapter"]["translations"]]
    assert scored == [c[0]["content"] for c in held_out] and len(scored) == 3
    assert not set(scored) & {c[0]["content"] for c in train}
    assert record["base"]["conversations"] == record["adapter"]["conversations"] == 3
    assert record["base"]["loss"] != record["adapter"]["loss"]
    assert "| metric | base | adapter |" in (tmp_path / "eval.md").read_text()
    assert "| metric | base | adapter |" in capsys.readouterr().out


def test_cli_refuses_a_run_that_held_nothing_out(short_run, tmp_path, capsys):
    """eval_fraction 0 means every pair was trained on: error, exit 2, instead of a flattering score."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_bytes((short_run["adapter"] / name).read_bytes())
    values = json.loads((short_run["adapter"] / "run_config.json").read_text()) | {"eval_fraction": 0.0}
    (adapter / "run_config.json").write_text(json.dumps(values))
    assert evaluate.main(["--adapter", str(adapter)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: the run held nothing out")


def test_end_of_run_report(short_run):
    """Metrics on the held-out split, the tutorial's sentence first among the samples, and the
    model back in train mode. Catches a report that leaves the model in eval mode (the rest of a
    run would train without dropout) or forgets the tutorial's sample."""
    model, tokenizer, held_out = short_run["model"], short_run["tokenizer"], short_run["held_out"]
    model.train()
    report = evaluate.end_of_run_report(model, tokenizer, held_out, n_samples=2, max_new_tokens=8)
    assert model.training
    assert report["eval_conversations"] == len(held_out) == 3
    loss_sum, count = evaluate.supervised_loss(model, tokenizer, held_out)
    # The same function on the same batches, twice: the same floats (approx's default 1e-6 only
    # forgives the division's last bit); a report on other conversations is off by percents.
    assert report["eval_loss"] == pytest.approx(loss_sum / count)
    assert [s["sentence"] for s in report["samples"]] == [SAMPLE_SENTENCE] + [c[0]["content"] for c in held_out[:2]]
    assert report["samples"][1]["reference"] == held_out[0][1]["content"]
    json.dumps(report)  # goes to metrics.jsonl
    assert SAMPLE_SENTENCE in evaluate.format_report(report)


def test_training_after_evaluation_gets_the_same_gradients(tiny_config):
    """Evaluating (an eval-mode, no-grad forward) on a 4-bit base must not change later LoRA
    gradients. Catches losing model.py's `support_avx512bf16_for_cpu = False` on CPUs with
    AVX512-BF16 (see model._keep_cpu_4bit_gradients)."""
    from test_generate import lora_grads_after

    def evaluate_once(model, tokenizer):
        evaluate.supervised_loss(model, tokenizer, CONVERSATIONS)

    untouched = lora_grads_after(tiny_config, lambda model, tokenizer: None)
    after = lora_grads_after(tiny_config, evaluate_once)
    assert untouched.keys() == after.keys() and len(untouched) > 0
    # The same step twice (no kernel state may change in between): within fp32 rounding of the
    # tiny model's step (conftest), where the gradients the bug gives are off by tens of percent.
    for name in untouched:
        assert_close_up_to_rounding(after[name], untouched[name], name=name)
