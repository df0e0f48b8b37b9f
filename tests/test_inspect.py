"""python -m yoda_raw.inspect: what it prints, and how it fails."""

import json
import subprocess
import sys
from pathlib import Path

from yoda_raw import inspect as inspect_cli
from yoda_raw.chat import load_tokenizer
from yoda_raw.config import TINY_DATASET
from yoda_raw.data import load_conversations
from yoda_raw.packing import build_rows

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY_ARGS = ["--tokenizer", "tiny", "--dataset", TINY_DATASET]


def test_json_is_nothing_but_the_rows(capsys):
    """Every stdout line is one row, exactly the rows training uses (in order), and nothing else."""
    assert inspect_cli.main([*TINY_ARGS, "--json", "--max-length", "48"]) == 0
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    expected = build_rows(load_tokenizer("tiny"), load_conversations(TINY_DATASET), 48)
    assert len(records) == len(expected) > 1
    for record, row in zip(records, expected, strict=True):
        assert set(record) == {"input_ids", "labels", "attention_mask"}
        assert record["input_ids"] == row["input_ids"] and record["labels"] == row["labels"]
        assert record["attention_mask"] == [1] * len(row["input_ids"])


def test_json_limit_and_options(capsys):
    assert inspect_cli.main([*TINY_ARGS, "--json", "--limit", "3", "--train-on", "all", "--packing", "none"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(records) == 3
    assert all(r["labels"] == r["input_ids"] for r in records)  # --train-on all
    assert records[0]["input_ids"][-1] == load_tokenizer("tiny").eos_token_id  # --packing none: one conversation


def test_text_marks_supervised_spans_and_prints_totals(capsys):
    assert inspect_cli.main([*TINY_ARGS, "--limit", "1", "--packing", "none"]) == 0
    out = capsys.readouterr().out
    assert "<|user|>The kettle is boiling in the kitchen.<|end|><|assistant|>" in out
    assert "[[Boiling in the kitchen, the kettle is. Yes, hrrmm.<|end|><|endoftext|>]]" in out
    assert "\033[" not in out  # no colour codes when stdout is not a terminal
    assert "... 51 more rows (--limit 1)" in out
    for total in ["conversations", "tokens", "supervised tokens", "rows", "padding"]:
        assert any(line.startswith(total + " ") for line in out.splitlines()), total
    assert [line.split()[1] for line in out.splitlines() if line.startswith("conversations")] == ["52"]


def test_bad_dataset_exits_2_with_one_line():
    """Run as users run it: exit status 2, one line on stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "yoda_raw.inspect", "--tokenizer", "tiny", "--dataset", "missing/yoda.jsonl"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == "error: dataset file not found: missing/yoda.jsonl\n"


def test_bad_row_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentence": "Hi."}\n')
    assert inspect_cli.main(["--tokenizer", "tiny", "--dataset", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {path}, line 1: missing field 'translation_extra'")
    assert len(captured.err.splitlines()) == 1 and captured.out == ""
