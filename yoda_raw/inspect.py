"""Show exactly what the model is trained on: the rows, token by token, and which tokens carry loss.

    python -m yoda_raw.inspect --tokenizer tiny --dataset yoda_raw/tiny_yoda.jsonl --limit 2
    python -m yoda_raw.inspect --tokenizer path/to/Phi-3-mini-4k-instruct --dataset yoda.jsonl --json
    python -m yoda_raw.inspect --tokenizer ~/.cache/yoda_raw/SmolLM2-135M-Instruct --dataset yoda.jsonl \
        --system-prompt "Translate into Yoda speak."

The rows are built by the same functions the training run uses (data.load_conversations,
packing.build_rows), over the whole dataset in file order: no held-out split, no shuffling.
Text output marks the supervised tokens (green on a terminal, [[in brackets]] otherwise) and
ends with totals. --json prints one JSON object per row and nothing else.
"""

import argparse
import json
import sys

from yoda_raw.chat import IGNORE, load_tokenizer
from yoda_raw.cli import ArgumentParser, run_command
from yoda_raw.config import TUTORIAL_DATASET, TUTORIAL_MODEL
from yoda_raw.data import load_conversations
from yoda_raw.errors import YodaError
from yoda_raw.packing import build_rows, count_tokens

GREEN, RESET = "\033[1;32m", "\033[0m"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m yoda_raw.inspect", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokenizer", default=TUTORIAL_MODEL, help="Hub id, local folder, or 'tiny' (default: the tutorial's model)."
    )
    parser.add_argument("--dataset", default=TUTORIAL_DATASET, help="Hub id, data file, or save_to_disk folder.")
    parser.add_argument("--max-length", type=int, default=64, help="Tokens per row.")
    parser.add_argument("--train-on", choices=["assistant", "all"], default="assistant")
    parser.add_argument("--packing", choices=["wrapped", "none"], default="wrapped")
    parser.add_argument("--prompt-field", default="sentence", help="Column that becomes the user turn.")
    parser.add_argument("--response-field", default="translation_extra", help="Column that becomes the assistant turn.")
    parser.add_argument(
        "--system-prompt", default=None, help="System message in front of each conversation without one, as run.py's."
    )
    parser.add_argument("--skip-invalid", action="store_true", help="Drop invalid rows instead of stopping.")
    parser.add_argument("--json", action="store_true", help="One JSON object per row, nothing else.")
    parser.add_argument("--limit", type=int, default=None, help="Show only the first N rows (totals still cover all).")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    return parser.parse_args(argv)


def row_as_text(tokenizer, row: dict, colour: bool) -> str:
    """The row decoded, with supervised spans in green (colour) or between [[ and ]].

    Spans are decoded in context (decode the row up to the span's end, minus the row up to its
    start), because a tokenizer may decode a token differently at the start of a string.
    """
    ids, labels = row["input_ids"], row["labels"]
    # Boundaries where supervision switches on or off: [0, ..., len(ids)]
    cuts = [0] + [t for t in range(1, len(ids)) if (labels[t] != IGNORE) != (labels[t - 1] != IGNORE)] + [len(ids)]
    open_mark, close_mark = (GREEN, RESET) if colour else ("[[", "]]")
    parts = []
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        before, upto = tokenizer.decode(ids[:start]), tokenizer.decode(ids[:end])
        text = upto[len(before) :] if upto.startswith(before) else tokenizer.decode(ids[start:end])
        parts.append(f"{open_mark}{text}{close_mark}" if labels[start] != IGNORE else text)
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """`python -m yoda_raw.inspect`: a mistake in the input is one line `error: ...`, status 2 (cli.py)."""
    return run_command(inspect_command, argv)


def inspect_command(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.limit is not None and args.limit < 0:
        raise YodaError(f"--limit must be 0 or more, got {args.limit}")
    if args.max_length < 2:
        raise YodaError(f"--max-length must be at least 2, got {args.max_length}")
    conversations = load_conversations(
        args.dataset,
        args.prompt_field,
        args.response_field,
        skip_invalid=args.skip_invalid,
        system_prompt=args.system_prompt,
    )
    tokenizer = load_tokenizer(args.tokenizer)
    rows = build_rows(tokenizer, conversations, args.max_length, args.train_on, args.packing)
    shown = rows if args.limit is None else rows[: args.limit]

    if args.json:
        for row in shown:
            # rows are not padded yet, so every token is attended to
            ids, labels = row["input_ids"], row["labels"]
            print(json.dumps({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}))
        return 0

    colour = sys.stdout.isatty()
    legend = f"{GREEN}green{RESET}" if colour else "[[in double brackets]]"
    print(f"supervised tokens are {legend}; the rest is masked (label -100)\n")
    for number, row in enumerate(shown, start=1):
        n_supervised = sum(label != IGNORE for label in row["labels"])
        print(f"--- row {number} of {len(rows)}: {len(row['input_ids'])} tokens, {n_supervised} supervised")
        print(row_as_text(tokenizer, row, colour))
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more rows (--limit {args.limit})")

    totals = count_tokens(rows, pad_to=args.max_length)
    print()
    print(f"conversations      {len(conversations):>9,}")
    print(f"tokens             {totals['tokens']:>9,}")
    print(f"supervised tokens  {totals['supervised_tokens']:>9,}  (--train-on {args.train_on})")
    print(f"rows               {totals['rows']:>9,}  (--packing {args.packing}, --max-length {args.max_length})")
    print(f"padding            {totals['padding']:>9,}  (if every row is padded to {args.max_length} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
