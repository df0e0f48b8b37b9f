"""Wrapped packing (and its parity with SFTTrainer), truncation, the collator, token counts."""

import random

import pytest
import torch

from yoda_raw.chat import IGNORE, tokenize_conversations
from yoda_raw.config import Config
from yoda_raw.errors import YodaError
from yoda_raw.packing import Collator, EpochSampler, build_rows, count_tokens, make_loader, pack_wrapped, truncate


def random_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        ids = [rng.randrange(1, 1000) for _ in range(rng.randrange(1, 50))]
        labels = [token if rng.random() < 0.5 else IGNORE for token in ids]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


@pytest.mark.parametrize("max_length", [2, 7, 64, 1000])
def test_wrapped_conserves_tokens_and_cuts_every_max_length(max_length):
    """No token lost, duplicated or reordered; labels stay with their tokens; every row but the last is full."""
    examples = random_examples(40)
    rows = pack_wrapped(examples, max_length)
    joined_ids = [t for e in examples for t in e["input_ids"]]
    joined_labels = [t for e in examples for t in e["labels"]]
    assert [t for r in rows for t in r["input_ids"]] == joined_ids
    assert [t for r in rows for t in r["labels"]] == joined_labels
    assert all(len(r["input_ids"]) == max_length for r in rows[:-1])
    assert 1 <= len(rows[-1]["input_ids"]) <= max_length
    assert all(len(r["labels"]) == len(r["input_ids"]) for r in rows)


def test_wrapped_exact_multiple_has_no_empty_row():
    examples = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    assert pack_wrapped(examples, 2) == [
        {"input_ids": [1, 2], "labels": [1, 2]},
        {"input_ids": [3, 4], "labels": [3, 4]},
    ]


def test_truncate():
    rows, n_truncated = truncate(random_examples(30), 10)
    originals = random_examples(30)
    assert n_truncated == sum(len(e["input_ids"]) > 10 for e in originals) > 0
    for row, original in zip(rows, originals, strict=True):
        assert row["input_ids"] == original["input_ids"][:10]
        assert row["labels"] == original["labels"][:10]


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # SFTConfig's own default
def test_build_rows_matches_sfttrainer_wrapped_packing(phi3_tokenizer, yoda_conversations, tmp_path):
    """The tutorial's rows: SFTTrainer itself (trl is a test-only dependency) prepares the 720 yoda
    conversations with packing_strategy="wrapped", max_length 64, loss on every token."""
    import datasets
    import transformers
    import trl
    from accelerate.state import AcceleratorState

    rows = build_rows(phi3_tokenizer, yoda_conversations, max_length=64, train_on="all", packing="wrapped")
    # A model is required to build the trainer; a very small one with Phi-3's vocabulary will do.
    config = transformers.Phi3Config(
        vocab_size=32064,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=32,
        pad_token_id=32000,
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        packing=True,
        packing_strategy="wrapped",
        max_length=64,
        report_to="none",
        bf16=False,
        use_cpu=True,
    )
    try:
        trainer = trl.SFTTrainer(
            model=transformers.Phi3ForCausalLM(config),
            args=args,
            train_dataset=datasets.Dataset.from_dict({"messages": yoda_conversations}),
            processing_class=phi3_tokenizer,
        )
        reference = trainer.train_dataset[:]
    finally:
        AcceleratorState._reset_state(True)  # the trainer's Accelerator state is process-wide

    assert len(rows) == len(reference["input_ids"]) == 341
    assert [r["input_ids"] for r in rows] == reference["input_ids"]
    assert [r["labels"] for r in rows] == reference["labels"]
    assert count_tokens(rows, pad_to=64) == {"rows": 341, "tokens": 21801, "supervised_tokens": 21801, "padding": 23}


def test_build_rows_assistant_only_on_yoda(phi3_tokenizer, yoda_conversations):
    """Same packed ids as with all-token loss; only the labels differ, masked where they should be."""
    every = build_rows(phi3_tokenizer, yoda_conversations, 64, train_on="all")
    assistant = build_rows(phi3_tokenizer, yoda_conversations, 64, train_on="assistant")
    assert [r["input_ids"] for r in assistant] == [r["input_ids"] for r in every]
    totals = count_tokens(assistant)
    assert totals["tokens"] == 21801 and 0 < totals["supervised_tokens"] < 21801


def test_build_rows_shuffle_is_seeded(tiny_tokenizer):
    conversations = [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
        for i in range(20)
    ]
    plain = build_rows(tiny_tokenizer, conversations, 32)
    a = build_rows(tiny_tokenizer, conversations, 32, shuffle=True, seed=1)
    b = build_rows(tiny_tokenizer, conversations, 32, shuffle=True, seed=1)
    c = build_rows(tiny_tokenizer, conversations, 32, shuffle=True, seed=2)
    assert a == b and a != c and a != plain
    assert sorted(t for r in a for t in r["input_ids"]) == sorted(t for r in plain for t in r["input_ids"])
    assert conversations[0][0]["content"] == "Question 0?"  # the caller's list is not shuffled in place


def test_build_rows_without_packing(tiny_tokenizer, capsys):
    """One conversation per row; long ones cut and reported; rows left with no supervised token
    (a long question that fills max_length) dropped and reported."""
    conversations = [
        [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hi, I say."}],
        [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "Long, that was."}],
    ]
    rows = build_rows(tiny_tokenizer, conversations, 16, packing="none")
    examples = tokenize_conversations(tiny_tokenizer, conversations)
    assert rows == [examples[0]] and len(examples[0]["input_ids"]) <= 16
    err = capsys.readouterr().err
    assert "truncated 1 of 2 conversations to 16 tokens" in err
    assert "dropped 1 rows with no supervised token" in err
    with pytest.raises(YodaError, match="raise --max-length"):
        build_rows(tiny_tokenizer, conversations[1:], 16, packing="none")


def test_bad_packing_options_are_refused_where_options_are_read():
    """Checked once, in config.py, for every command: a misspelt strategy and rows too short to
    predict anything (one token has no next token)."""
    with pytest.raises(YodaError, match=r"^--packing must be one of wrapped, none, got 'bfd'$"):
        Config(packing="bfd")
    with pytest.raises(YodaError, match=r"^--max-length must be at least 2, got 1$"):
        Config(max_length=1)


@pytest.mark.parametrize("as_tensors", [False, True])  # rows as build_rows makes them, or as make_loader keeps them
def test_collator(as_tensors):
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]},
        {"input_ids": [8], "labels": [8]},
        {"input_ids": [9, 10], "labels": [IGNORE, IGNORE]},
    ]
    if as_tensors:
        rows = [{key: torch.tensor(values) for key, values in row.items()} for row in rows]
    batch = Collator(pad_id=0)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE], [IGNORE, IGNORE, IGNORE]]


def test_collated_rows_conserve_tokens(tiny_tokenizer):
    """Batches of packed rows, minus padding, give back the joined conversations."""
    conversations = [
        [{"role": "user", "content": f"Is {i} big?"}, {"role": "assistant", "content": f"Big, {i} is."}]
        for i in range(30)
    ]
    examples = tokenize_conversations(tiny_tokenizer, conversations)
    rows = build_rows(tiny_tokenizer, conversations, 24)
    batch = Collator(pad_id=tiny_tokenizer.pad_token_id)(rows)
    real = batch["attention_mask"].bool()
    assert batch["input_ids"][real].tolist() == [t for e in examples for t in e["input_ids"]]
    assert batch["labels"][real].tolist() == [t for e in examples for t in e["labels"]]
    assert (batch["labels"][~real] == IGNORE).all() and (batch["input_ids"][~real] == tiny_tokenizer.pad_token_id).all()
    assert int(real.sum()) == count_tokens(rows)["tokens"]


def test_the_loader_collates_the_rows_in_the_samplers_order_every_epoch():
    """make_loader keeps its rows as tensors (collating is then only copies): its micro-batches are
    still the collated rows in the sampler's order, epoch after epoch, and the rows the caller holds
    stay lists (train.fit counts and reuses them). Catches rows reordered or dropped by the
    conversion, or the caller's rows changed in place."""
    rows = random_examples(23)
    before = [dict(row) for row in rows]
    collator, sampler = Collator(pad_id=0), EpochSampler(len(rows), shuffle=True, seed=3)
    loader = make_loader(rows, 5, collator, sampler, torch.device("cpu"))
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = list(loader)
        assert len(batches) == 5  # 23 rows, 5 a batch: the last has 3
        for i, batch in enumerate(batches):
            expected = collator([rows[j] for j in order[5 * i : 5 * i + 5]])
            assert batch.keys() == expected.keys()
            assert all(torch.equal(batch[key], expected[key]) for key in batch)
    assert rows == before


def test_count_tokens():
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    assert count_tokens(rows) == {"rows": 2, "tokens": 4, "supervised_tokens": 3}
    assert count_tokens(rows, pad_to=4)["padding"] == 1 + 3
