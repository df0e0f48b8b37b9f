"""Where a model, tokenizer or dataset comes from: a local path, or a Hugging Face Hub id.

Every `--model`, `--tokenizer` and `--dataset` is a string that may name either. When nothing
exists at that path, the loaders ask `looks_like_local_path` whether the user meant a file (then
"not found" is the right message, at once) or a Hub repository (then the Hub is asked, which
without network access retries for half a minute). The stages that load things (data.py, chat.py,
model.py) all import the rule from here, so they word their errors alike.
"""

import re
from pathlib import Path

# The file types data.py reads; a name ending in one of them is a file, never a Hub id.
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# A Hub repository id: "name" or "namespace/name", letters, digits and - _ . only.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_local_path(source: str) -> bool:
    """True when `source` can only mean a local path, never a Hub id.

    >>> [looks_like_local_path(s) for s in ["dvgodoy/yoda_sentences", "data.jsonl", "./data", "a/b/c"]]
    [False, True, True, True]
    """
    return (
        source.startswith((".", "/", "~"))
        or Path(source).suffix.lower() in DATA_SUFFIXES
        or _HUB_ID.fullmatch(source) is None  # two slashes, a backslash, a space...
    )
