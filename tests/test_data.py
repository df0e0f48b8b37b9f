"""Loading rows from every kind of source, the errors bad rows give, and the held-out split."""

import csv
import json

import datasets
import pytest

from yoda_raw.data import load_conversations, split_conversations
from yoda_raw.errors import YodaError
from yoda_raw.sources import looks_like_local_path

ROWS = [
    {
        "sentence": "The cat sleeps.",
        "translation": "Sleeps, the cat does.",
        "translation_extra": "Sleeps, the cat does. Hmm.",
    },
    {
        "sentence": "We leave at dawn.",
        "translation": "At dawn, leave we will.",
        "translation_extra": "At dawn, leave we will.",
    },
]
EXPECTED = [
    [{"role": "user", "content": "The cat sleeps."}, {"role": "assistant", "content": "Sleeps, the cat does. Hmm."}],
    [{"role": "user", "content": "We leave at dawn."}, {"role": "assistant", "content": "At dawn, leave we will."}],
]


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(YodaError) as info:
        load_conversations(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message  # one line, for the command line
    return message


# --- sources -----------------------------------------------------------------------------------


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert load_conversations(path) == EXPECTED


def test_jsonl_blank_lines_are_not_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n\n")
    assert load_conversations(str(path)) == EXPECTED


def test_other_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    conversations = load_conversations(path, prompt_field="sentence", response_field="translation")
    assert conversations[0][1]["content"] == "Sleeps, the cat does."


def test_json_array_and_json_lines_named_json(tmp_path):
    array = tmp_path / "array.json"
    array.write_text(json.dumps(ROWS, indent=2))
    lines = write_jsonl(tmp_path / "lines.json", ROWS)
    assert load_conversations(str(array)) == EXPECTED
    assert load_conversations(lines) == EXPECTED


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    assert load_conversations(str(path)) == EXPECTED


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert load_conversations(str(path)) == EXPECTED


def test_save_to_disk_folder_and_split(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS[1:])}
    ).save_to_disk(str(tmp_path / "two"))
    assert load_conversations(str(tmp_path / "one")) == EXPECTED
    assert load_conversations(str(tmp_path / "two"), split="test") == EXPECTED[1:]
    assert "no split 'validation'" in error_of(str(tmp_path / "two"), split="validation")


def test_messages_column_passes_through(tmp_path):
    """System messages and several turns are kept in order; extra keys are dropped."""
    messages = [
        {"role": "system", "content": "Be Yoda."},
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hello, I say.", "name": "yoda"},
        {"role": "user", "content": "Bye."},
        {"role": "assistant", "content": "Bye, I say."},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    (conversation,) = load_conversations(path)
    assert conversation == [{"role": m["role"], "content": m["content"]} for m in messages]


def test_real_yoda_file(yoda_rows_path):
    conversations = load_conversations(str(yoda_rows_path))
    assert len(conversations) == 720
    assert conversations[0] == [
        {"role": "user", "content": "The birch canoe slid on the smooth planks."},
        {"role": "assistant", "content": "On the smooth planks, the birch canoe slid. Yes, hrrrm."},
    ]


# --- where the data is -------------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    assert error_of(missing) == f"dataset file not found: {missing}"
    assert error_of("data/nope.csv") == "dataset file not found: data/nope.csv"
    assert error_of("./nope") == "dataset file not found: ./nope"


def test_path_or_hub_id():
    """A Hub id must not be taken for a missing file, nor a path for a Hub id (a 30 s retry loop)."""
    assert not looks_like_local_path("dvgodoy/yoda_sentences")
    assert not looks_like_local_path("imdb")
    for path in ["yoda.jsonl", "./yoda", "../data", "/abs/yoda", "~/yoda", "a/b/c", "C:\\data\\yoda"]:
        assert looks_like_local_path(path), path


def test_unreachable_hub():
    """conftest puts the Hub offline: the error says so and says how to pass a local file."""
    message = error_of("someone/some_dataset")
    assert "cannot reach the Hugging Face Hub" in message
    assert "--dataset path/to/data.jsonl" in message


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    assert "unsupported file type" in error_of(str(path))


# --- bad rows ----------------------------------------------------------------------------------


def test_broken_json_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], '{"sentence": "oops",', ROWS[1]])
    assert error_of(path).startswith(f"{path}, line 2: not valid JSON")


def test_broken_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"sentence": "a", "translation_extra": "b"},\n{"sentence": }\n]')
    assert error_of(str(path)).startswith(f"{path}, line 3: not valid JSON")


def test_missing_field_names_the_row_and_the_options(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"sentence": "Hi.", "yoda": "Hi, I say."}])
    message = error_of(path)
    assert message.startswith(f"{path}, line 2: missing field 'translation_extra'")
    assert "the row has: sentence, yoda" in message
    assert "--prompt-field/--response-field" in message


@pytest.mark.parametrize(
    "value, expected",
    [
        ("", "field 'translation_extra' is empty"),
        ("   \n", "field 'translation_extra' is empty"),
        (None, "field 'translation_extra' is missing (null)"),
        (42, "field 'translation_extra' is not a string but int"),
        (["a", "b"], "field 'translation_extra' is not a string but list"),
    ],
)
def test_bad_content(tmp_path, value, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"sentence": "Hi.", "translation_extra": value}])
    assert error_of(path).startswith(f"{path}, line 2: {expected}")


def test_csv_empty_cell_names_the_file_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('sentence,translation_extra\nHi.,"Hi, I say."\nBye.,\n')
    assert error_of(str(path)) == f"{path}, line 3: field 'translation_extra' is empty"


def test_row_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['["a", "b"]'])
    assert "line 1: a row must be an object" in error_of(path)


@pytest.mark.parametrize(
    "messages, expected",
    [
        (
            [{"role": "narrator", "content": "Once."}, {"role": "assistant", "content": "Hm."}],
            "message 1 has unknown role 'narrator' (allowed: system, user, assistant)",
        ),
        ([{"role": "user", "content": "Hi."}], "the conversation has no assistant turn"),
        ([{"role": "assistant", "content": "Hm."}], "the conversation opens with an assistant message"),
        (  # trained fine, then failed the end-of-run evaluation, which needs a prompt for each answer
            [{"role": "system", "content": "Be Yoda."}, {"role": "assistant", "content": "Hm."}],
            "the conversation has no user message before its first assistant message",
        ),
        ([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": ""}], "message 2 content is empty"),
        (
            [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": 7}],
            "message 2 content is not a string",
        ),
        ([{"role": "user"}], "message 1 must be an object with 'role' and 'content'"),
        ([], "'messages' must be a non-empty list"),
        ("Hi.", "'messages' must be a non-empty list"),
    ],
)
def test_bad_messages(tmp_path, messages, expected):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}])
    assert error_of(path).startswith(f"{path}, line 1: {expected}")


def test_empty_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n")
    assert error_of(str(path)) == f"dataset {path} is empty: it has no rows"


def test_skip_invalid_counts_and_reports(tmp_path, capsys):
    """Bad rows are dropped only when asked, and never silently: stderr says how many and the first."""
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], "{broken", {"sentence": "x", "translation_extra": ""}, ROWS[1]])
    assert load_conversations(path, skip_invalid=True) == EXPECTED
    err = capsys.readouterr().err
    assert err.startswith(f"skipped 2 invalid rows (first: {path}, line 2: not valid JSON")
    assert len(err.strip().splitlines()) == 1


def test_skip_invalid_with_nothing_left(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", ["{broken"])
    assert error_of(path, skip_invalid=True) == f"dataset {path} is empty: all 1 rows are invalid"


def test_valid_data_prints_nothing(tmp_path, capsys):
    load_conversations(write_jsonl(tmp_path / "d.jsonl", ROWS), skip_invalid=True)
    assert capsys.readouterr().err == ""


# --- held-out split ----------------------------------------------------------------------------


def test_split_is_seeded_and_a_partition():
    items = list(range(100))
    train, held = split_conversations(items, 0.1, seed=42)
    assert (train, held) == split_conversations(items, 0.1, seed=42)
    assert held != split_conversations(items, 0.1, seed=43)[1]
    assert len(held) == 10 and sorted(train + held) == items
    assert train == sorted(train) and held == sorted(held)  # both keep the input order
    assert held != list(range(90, 100))  # random, not the tail


def test_split_edges():
    """Fraction 0 holds out nothing; a small fraction still holds out one; one conversation stays in train."""
    assert split_conversations(list("abc"), 0.0, seed=0) == (list("abc"), [])
    train, held = split_conversations(list("abc"), 0.01, seed=0)
    assert len(held) == 1 and len(train) == 2
    assert split_conversations(["a"], 0.5, seed=0) == (["a"], [])
    assert len(split_conversations(list("ab"), 0.9, seed=0)[0]) == 1  # never all held out
    with pytest.raises(YodaError):
        split_conversations(list("ab"), 1.0, seed=0)


def test_split_of_the_yoda_set(yoda_conversations):
    train, held = split_conversations(yoda_conversations, 0.05, seed=42)
    assert (len(train), len(held)) == (684, 36)
