"""Rows of a dataset -> conversations, checked; and the held-out split.

A conversation is a list of messages, each `{"role": ..., "content": ...}`, the format chat
templates take. Two row shapes are accepted:

- two text columns (the yoda set: `sentence` and `translation_extra`), which become
  `[{"role": "user", "content": sentence}, {"role": "assistant", "content": translation_extra}]`;
- a `messages` column that already holds a conversation (system messages and several turns allowed).

Sources: a Hub id (`dvgodoy/yoda_sentences`), a local .jsonl/.json/.csv/.parquet file, or a folder
written by `datasets.Dataset.save_to_disk`.

A system prompt (`--system-prompt`) goes in front of every conversation that has no system
message of its own (`with_system_prompt`); generation builds its prompts with the same function.

Every row is checked, and a bad row stops the run with a message that names the file, the row
and what is wrong: a run that silently trains on half the data is worse than one that stops.
`skip_invalid=True` drops bad rows instead, and says how many on stderr.
"""

import csv
import hashlib
import json
import random
import sys
from pathlib import Path

from yoda_raw.errors import YodaError
from yoda_raw.errors import reason as error_reason
from yoda_raw.sources import DATA_SUFFIXES, looks_like_local_path

ROLES = ("system", "user", "assistant")


# --- reading rows ------------------------------------------------------------------------------
# Each reader returns a list of (where, row) pairs: `where` names the row for error messages
# ("data.jsonl, line 7") and `row` is whatever the line held, checked later by _to_conversation.


def _read_jsonl(path: Path) -> list[tuple[str, object]]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # a blank line (often the last one) holds no row
            where = f"{path}, line {number}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((where, _Unreadable(f"not valid JSON ({e.msg} at column {e.colno})")))
    return rows


def _read_json(path: Path) -> list[tuple[str, object]]:
    # A .json file is either one JSON array of rows or, as often, JSON Lines under another name.
    text = path.read_text(encoding="utf-8-sig")
    if not text.lstrip().startswith("["):
        return _read_jsonl(path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise YodaError(f"{path}, line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    return [(f"{path}, row {number}", row) for number, row in enumerate(rows, start=1)]


def _read_csv(path: Path) -> list[tuple[str, object]]:
    # utf-8-sig: a byte-order mark (Excel writes one) would otherwise become part of the first column's name.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        # reader.line_num is the file line where the row ended (the header is line 1)
        return [(f"{path}, line {reader.line_num}", row) for row in reader]


def _read_parquet(path: Path) -> list[tuple[str, object]]:
    import pyarrow.parquet  # installed with datasets

    rows = pyarrow.parquet.read_table(path).to_pylist()
    return [(f"{path}, row {number}", row) for number, row in enumerate(rows, start=1)]


def _read_saved(path: Path, split: str) -> list[tuple[str, object]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise YodaError(f"{path} is a folder but not one written by save_to_disk (no dataset_info.json)") from None
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise YodaError(f"{path} has no split {split!r}; it has: {', '.join(dataset)}")
        dataset = dataset[split]
    return [(f"{path}, row {number}", row) for number, row in enumerate(dataset, start=1)]


def _read_hub(source: str, split: str) -> list[tuple[str, object]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except ConnectionError:
        raise YodaError(
            f"cannot reach the Hugging Face Hub to download dataset {source!r}; "
            f"pass a local file instead, e.g. --dataset path/to/data.jsonl"
        ) from None
    except FileNotFoundError:  # datasets' DatasetNotFoundError
        raise YodaError(f"dataset {source!r} not found on the Hugging Face Hub (nor as a local path)") from None
    return [(f"{source} ({split}), row {number}", row) for number, row in enumerate(dataset, start=1)]


class _Unreadable:
    """Stands in for a row that could not be parsed, so that it is reported like any bad row."""

    def __init__(self, problem: str):
        self.problem = problem


def _read_rows(source: str, split: str) -> list[tuple[str, object]]:
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved(path, split)
    if path.is_file():
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        reader = readers.get(path.suffix.lower())
        if reader is None:
            raise YodaError(f"{path}: unsupported file type; use one of {', '.join(DATA_SUFFIXES)}")
        try:
            return reader(path)
        except UnicodeDecodeError as err:
            raise YodaError(
                f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
                "save it as UTF-8, or check that it is the file you meant"
            ) from None
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError: a damaged .parquet
            reason = error_reason(err)
            raise YodaError(f"{path}: cannot read it as {path.suffix} ({reason})") from None
    if looks_like_local_path(source):
        raise YodaError(f"dataset file not found: {source}")
    return _read_hub(source, split)


# --- checking rows -----------------------------------------------------------------------------


def _check_content(content: object, name: str) -> None:
    """Raise ValueError if a message text is not a non-empty string."""
    if content is None:
        raise ValueError(f"{name} is missing (null)")
    if not isinstance(content, str):
        raise ValueError(f"{name} is not a string but {type(content).__name__}: {content!r:.60}")
    if not content.strip():
        raise ValueError(f"{name} is empty")


def _to_conversation(row: object, prompt_field: str, response_field: str) -> list[dict]:
    """One row -> one conversation, or ValueError saying what is wrong with the row.

    >>> _to_conversation({"sentence": "Hi.", "translation_extra": "Hi, I say."}, "sentence", "translation_extra")
    [{'role': 'user', 'content': 'Hi.'}, {'role': 'assistant', 'content': 'Hi, I say.'}]
    """
    if isinstance(row, _Unreadable):
        raise ValueError(row.problem)
    if not isinstance(row, dict):
        raise ValueError(f"a row must be an object with named fields, got {type(row).__name__}")

    # A `messages` column is used as it is: it already is a conversation.
    if "messages" in row:
        return _check_messages(row["messages"])

    missing = [name for name in (prompt_field, response_field) if name not in row]
    if missing:
        raise ValueError(
            f"missing field {missing[0]!r} (the row has: {', '.join(map(str, row)) or 'no fields'}); "
            f"choose columns with --prompt-field/--response-field, or give a 'messages' column"
        )
    _check_content(row[prompt_field], f"field {prompt_field!r}")
    _check_content(row[response_field], f"field {response_field!r}")
    return [{"role": "user", "content": row[prompt_field]}, {"role": "assistant", "content": row[response_field]}]


def _check_messages(messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    conversation = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {number} must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise ValueError(f"message {number} has unknown role {message['role']!r} (allowed: {', '.join(ROLES)})")
        _check_content(message["content"], f"message {number} content")
        # Keep only role and content: other keys (names, tool calls) could change what the template renders.
        conversation.append({"role": message["role"], "content": message["content"]})
    if conversation[0]["role"] == "assistant":
        raise ValueError("the conversation opens with an assistant message; start it with a user or system message")
    # After any system messages, a user message: an answer needs a question, and evaluation and
    # the end-of-run report take the user message before the last answer as its prompt.
    if next(m["role"] for m in conversation if m["role"] != "system") != "user":
        raise ValueError("the conversation has no user message before its first assistant message; add one")
    if not any(message["role"] == "assistant" for message in conversation):
        raise ValueError("the conversation has no assistant turn, so there is nothing to learn from it")
    return conversation


def with_system_prompt(conversation: list[dict], system_prompt: str | None) -> list[dict]:
    """The conversation with a system message in front, unless it has one already or there is no
    prompt. Without one, some chat templates write their own (SmolLM2's: 21 tokens of "You are a
    helpful AI assistant named SmolLM, ..." in every conversation).

    >>> with_system_prompt([{"role": "user", "content": "Hi."}], "Speak like Yoda.")
    [{'role': 'system', 'content': 'Speak like Yoda.'}, {'role': 'user', 'content': 'Hi.'}]
    >>> with_system_prompt([{"role": "user", "content": "Hi."}], None)
    [{'role': 'user', 'content': 'Hi.'}]
    """
    if system_prompt is None or conversation[0]["role"] == "system":
        return conversation
    return [{"role": "system", "content": system_prompt}, *conversation]


def load_conversations(
    source: str,
    prompt_field: str = "sentence",
    response_field: str = "translation_extra",
    split: str = "train",
    skip_invalid: bool = False,
    system_prompt: str | None = None,
) -> list[list[dict]]:
    """Read a dataset and return its conversations, in the order of the file, each with
    `system_prompt` in front unless it has a system message (see with_system_prompt).

    `split` applies to Hub ids and save_to_disk folders of several splits; a file is one split.
    A bad row raises YodaError("data.jsonl, line 7: field 'sentence' is empty"); with
    `skip_invalid=True` bad rows are dropped and one line on stderr says how many.
    """
    rows = _read_rows(source, split)

    conversations, problems = [], []
    for where, row in rows:
        try:
            conversations.append(with_system_prompt(_to_conversation(row, prompt_field, response_field), system_prompt))
        except ValueError as e:
            if not skip_invalid:
                raise YodaError(f"{where}: {e}") from None
            problems.append(f"{where}: {e}")

    if problems:
        print(f"skipped {len(problems)} invalid rows (first: {problems[0]})", file=sys.stderr)
    if not conversations:
        reason = f"all {len(rows)} rows are invalid" if rows else "it has no rows"
        raise YodaError(f"dataset {source} is empty: {reason}")
    return conversations


def content_sha256(conversations: list[list[dict]]) -> str:
    """What identifies a data set: a hash of its conversations, in order (the held-out split depends
    on the order). The same content read from .jsonl or .parquet has the same hash."""
    return hashlib.sha256(json.dumps(conversations, ensure_ascii=False).encode()).hexdigest()


def split_conversations(conversations: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random share of the conversations: returns (train, held_out).

    Which conversations are held out depends only on `seed` and the number of conversations;
    both parts keep the order of the input. With a fraction above 0 and at least two
    conversations, at least one is held out and at least one is kept for training.

    >>> split_conversations(list("abcdefghij"), 0.2, seed=0)
    (['a', 'b', 'c', 'd', 'e', 'f', 'g', 'j'], ['h', 'i'])
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise YodaError(f"eval fraction must be in [0, 1), got {eval_fraction}")
    n = len(conversations)
    n_held_out = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        n_held_out = min(max(n_held_out, 1), n - 1)
    else:
        n_held_out = 0

    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_held_out])
    train = [c for i, c in enumerate(conversations) if i not in held_out]
    held = [c for i, c in enumerate(conversations) if i in held_out]
    return train, held
