"""Held-out evaluation: how well does the model translate sentences it never trained on?

    python -m yoda_raw.evaluate --adapter out-tiny
    python -m yoda_raw.evaluate --adapter out --dataset other.jsonl --limit 100

By default it scores the held-out split that training kept apart: the run's dataset, split again
with the run's seed and --eval-fraction (both read from run_config.json), so it is exactly the
conversations the adapter never saw. Another --dataset is scored whole.

Metrics, for the base model (adapter disabled) and with the adapter, side by side:
- loss: cross-entropy on the supervised tokens (the same assistant-only labels as training: the
  answer and the template's end-of-turn token after it, for Phi-3 `<|end|>` and the final
  `<|endoftext|>`, for SmolLM2 `<|im_end|>`), summed over all held-out
  conversations and divided by their number of supervised tokens; one conversation per row,
  no packing, so each answer is predicted from its own prompt only (as in generation);
- perplexity: exp(loss);
- exact match: share of greedy translations equal to the reference (surrounding whitespace ignored);
- chrF and BLEU: sacrebleu's corpus scores (0-100) against the reference, the response field
  (translation_extra for the yoda set). sacrebleu is an optional extra: `pip install -e .[eval]`.

Conversations and generation prompts get the run's --system-prompt, as in training.

Results go to eval.json (all numbers and every translation) and eval.md (the table), in the
adapter folder unless --output-dir says otherwise.
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from yoda_raw.chat import tokenize_conversations
from yoda_raw.cli import ArgumentParser, run_command
from yoda_raw.data import content_sha256, load_conversations, split_conversations
from yoda_raw.errors import YodaError
from yoda_raw.generate import (
    SAMPLE_SENTENCE,
    check_context,
    check_sampling,
    load_for_inference,
    read_run_config,
    translate,
)
from yoda_raw.loss import supervised_count, token_loss_sum
from yoda_raw.output import check_no_file_in_the_way
from yoda_raw.packing import Collator

METRICS = ("loss", "perplexity", "exact_match", "chrf", "bleu")  # the table's rows, in order


# --- the pieces of a conversation that are scored -----------------------------------------------


def prompt_and_reference(conversation: list[dict]) -> tuple[str, str]:
    """The last assistant message is the reference; the user message before it is the prompt.

    >>> prompt_and_reference([{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hi, I say."}])
    ('Hi.', 'Hi, I say.')
    """
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    users = [m["content"] for m in conversation[:last] if m["role"] == "user"]
    if not users:
        raise YodaError("a conversation to evaluate needs a user message before its last assistant message")
    return users[-1], conversation[last]["content"]


# --- loss on supervised tokens ------------------------------------------------------------------


@torch.no_grad()
def supervised_loss(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16) -> tuple[float, int]:
    """(sum of token cross-entropies, number of supervised tokens) over `conversations`.

    Labels come from chat.tokenize_conversation with train_on="assistant", as in training; each
    conversation is its own right-padded row (padding has label -100 and attention 0). The model
    is put in eval mode (no dropout) and given back in the mode it came in.
    """
    examples = tokenize_conversations(tokenizer, conversations, train_on="assistant")
    collate = Collator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_tokens = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
            loss_sum += token_loss_sum(model, batch)  # the loss training minimises, summed
            n_tokens += supervised_count(batch)
    finally:
        model.train(was_training)
    return float(loss_sum), int(n_tokens)  # host syncs, once


# --- text metrics -------------------------------------------------------------------------------


def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:
        raise YodaError("chrF and BLEU need sacrebleu: pip install -e .[eval]  (or: pip install sacrebleu)") from None
    return sacrebleu


def text_metrics(predictions: list[str], references: list[str], require_sacrebleu: bool = True) -> dict:
    """Exact match (0-1), chrF and BLEU (0-100, corpus level) of predictions against references.

    Without sacrebleu, chrf and bleu are None when require_sacrebleu=False, else YodaError.

    >>> text_metrics(["Strong, you are.", "Hmm."], ["Strong, you are. ", "Yes."])["exact_match"]
    0.5
    """
    if len(predictions) != len(references) or not references:
        raise YodaError(f"need as many predictions as references, and some: {len(predictions)} and {len(references)}")
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / len(references)
    try:
        sacrebleu = _sacrebleu()
    except YodaError:
        if require_sacrebleu:
            raise
        return {"exact_match": exact, "chrf": None, "bleu": None}
    return {
        "exact_match": exact,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
    }


# --- one model, both kinds of metric ------------------------------------------------------------


def evaluate(
    model,
    tokenizer,
    conversations: list[list[dict]],
    batch_size: int = 16,
    max_new_tokens: int = 64,
    require_sacrebleu: bool = True,
    system_prompt: str | None = None,
) -> dict:
    """Loss, perplexity, exact match, chrF and BLEU of `model` on `conversations`, with its translations.

    Returns {"conversations", "supervised_tokens", "loss", "perplexity", "exact_match", "chrf",
    "bleu", "translations": [{"sentence", "translation", "reference"}, ...]}. The translations are
    generated with `system_prompt` in front, as `conversations` carry it (data.load_conversations).
    """
    if not conversations:
        raise YodaError("nothing to evaluate: no conversations")
    if require_sacrebleu:
        _sacrebleu()  # fail before the slow part
    loss_sum, n_tokens = supervised_loss(model, tokenizer, conversations, batch_size)
    loss = loss_sum / n_tokens
    prompts, references = zip(*(prompt_and_reference(c) for c in conversations), strict=True)
    predictions = translate(
        model, tokenizer, list(prompts), max_new_tokens, batch_size=batch_size, system_prompt=system_prompt
    )
    return {
        "conversations": len(conversations),
        "supervised_tokens": n_tokens,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        **text_metrics(predictions, list(references), require_sacrebleu),
        "translations": [
            {"sentence": s, "translation": p, "reference": r}
            for s, p, r in zip(prompts, predictions, references, strict=True)
        ],
    }


def compare(model, tokenizer, conversations: list[list[dict]], **kwargs) -> dict:
    """{"base": evaluate(...) with the adapter switched off, "adapter": evaluate(...) with it}."""
    with model.disable_adapter():  # peft: the LoRA branches are skipped inside this block
        base = evaluate(model, tokenizer, conversations, **kwargs)
    return {"base": base, "adapter": evaluate(model, tokenizer, conversations, **kwargs)}


def markdown_table(results: dict) -> str:
    """The metrics of each column of `results` ({"base": {...}, "adapter": {...}}) as a Markdown table."""
    columns = list(results)
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name in METRICS:
        cells = [_cell(results[c].get(name), name) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value, name: str) -> str:
    if value is None:
        return "n/a"
    if name == "exact_match":
        return f"{100 * value:.1f}%"
    return f"{value:.4f}" if name in ("loss", "perplexity") else f"{value:.2f}"


# --- end of a training run ----------------------------------------------------------------------


def end_of_run_report(
    model,
    tokenizer,
    held_out: list[list[dict]],
    n_samples: int = 3,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> dict:
    """A short evaluation for the end of train.main: held-out metrics and a few sample translations.

    Returns a flat dict for metrics.jsonl: eval_conversations, eval_loss, eval_perplexity,
    eval_exact_match, eval_chrf, eval_bleu (None when nothing is held out, chrF/BLEU also None
    without sacrebleu: a finished run should not fail over an optional extra), and "samples":
    the tutorial's "The Force is strong in you!" and the first `n_samples` held-out sentences,
    each {"sentence", "translation", "reference"} (reference None for the tutorial's). The model
    comes back in the mode it was in.
    """
    report = {f"eval_{name}": None for name in ("conversations", *METRICS)}
    samples = [{"sentence": SAMPLE_SENTENCE, "translation": None, "reference": None}]
    if held_out:
        metrics = evaluate(model, tokenizer, held_out, batch_size, max_new_tokens, False, system_prompt)
        report |= {f"eval_{name}": metrics[name] for name in ("conversations", *METRICS)}
        samples += metrics["translations"][:n_samples]
    samples[0]["translation"] = translate(
        model, tokenizer, [SAMPLE_SENTENCE], max_new_tokens=max_new_tokens, system_prompt=system_prompt
    )[0]
    return report | {"samples": samples}


def format_report(report: dict) -> str:
    """end_of_run_report as a few lines for the terminal."""
    lines = []
    if report.get("eval_conversations"):
        metrics = ", ".join(
            f"{name} {_cell(report[f'eval_{name}'], name)}" for name in METRICS if report[f"eval_{name}"] is not None
        )
        lines.append(f"held out ({report['eval_conversations']} conversations): {metrics}")
    for sample in report["samples"]:
        lines.append(f"  {sample['sentence']}\n    -> {sample['translation']}")
        if sample["reference"] is not None:
            lines.append(f"       (reference: {sample['reference']})")
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------------


def conversations_to_score(
    cfg,
    dataset: str | None = None,
    split: str = "train",
    prompt_field: str | None = None,
    response_field: str | None = None,
    limit: int | None = None,
) -> tuple[list, str]:
    """(conversations, a description): the run's held-out split, or all of another dataset."""
    prompt_field = prompt_field or cfg.prompt_field
    response_field = response_field or cfg.response_field
    if dataset is None or dataset == cfg.dataset:
        if cfg.eval_fraction == 0:
            raise YodaError(
                f"the run held nothing out (eval_fraction 0): it trained on all of {cfg.dataset}; "
                "pass --dataset with other data"
            )
        conversations = load_conversations(
            cfg.dataset, prompt_field, response_field, split, cfg.skip_invalid, cfg.system_prompt
        )
        # The split is made again from the file: if its content changed (rows reordered, added, edited),
        # the "held-out" rows would include rows the adapter trained on. None: an adapter from before it was recorded.
        if cfg.data_sha256 not in (None, content_sha256(conversations)):
            raise YodaError(
                f"{cfg.dataset} has changed since the adapter was trained on it, so its held-out split would "
                "include training rows; restore that data, or score other data with --dataset"
            )
        _, held_out = split_conversations(conversations, cfg.eval_fraction, cfg.seed)
        described = f"held-out split of {cfg.dataset} (eval_fraction {cfg.eval_fraction}, seed {cfg.seed})"
        conversations = held_out
    else:
        conversations = load_conversations(
            dataset, prompt_field, response_field, split, system_prompt=cfg.system_prompt
        )
        described = f"all of {dataset} ({split})"
    if limit is not None:
        conversations = conversations[:limit]
    if not conversations:
        raise YodaError(f"nothing to evaluate in the {described}")
    return conversations, described


def check_writable_dir(path: Path, option: str) -> None:
    """Make the folder `path` (or find it there) and check that files can be written into it."""
    check_no_file_in_the_way(path, f"{option} {path}", "choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise YodaError(f"{option} {path}: cannot make the folder ({err.strerror}); choose another") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise YodaError(f"{option} {path}: cannot write there (permission denied); choose another folder")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m yoda_raw.evaluate",
        description="Score the base model and the adapter side by side on the held-out split (or --dataset): "
        "loss and perplexity on supervised tokens, exact match, chrF, BLEU.",
    )
    parser.add_argument("--adapter", required=True, help="Output folder of a training run (adapter + run_config.json).")
    parser.add_argument("--dataset", default=None, help="Score all of this dataset, not the held-out split.")
    parser.add_argument("--split", default="train", help="Split of a Hub dataset or save_to_disk folder.")
    parser.add_argument("--prompt-field", default=None, help="Default: the run's.")
    parser.add_argument("--response-field", default=None, help="Default: the run's (the reference).")
    parser.add_argument("--limit", type=int, default=None, help="Score only the first N conversations.")
    parser.add_argument("--batch-size", type=int, default=16, help="Conversations per forward / generate call.")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Most tokens generated per translation.")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
    parser.add_argument("--quant", choices=["nf4", "none"], default=None, help="Override the run's --quant.")
    parser.add_argument("--output-dir", default=None, help="For eval.json and eval.md (default: --adapter).")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`python -m yoda_raw.evaluate`: a mistake in the input is one line `error: ...`, status 2 (cli.py)."""
    return run_command(evaluate_command, argv)


def evaluate_command(argv: list[str]) -> int:
    args = parse_args(argv)
    out = Path(args.output_dir or args.adapter)
    # Every check before the slow part: a bad number or output folder found after the
    # evaluation would lose its results.
    if args.limit is not None and args.limit < 1:
        raise YodaError(f"--limit must be at least 1, got {args.limit}")
    check_sampling(args.max_new_tokens, 0.0, 1.0, args.batch_size)
    _sacrebleu()
    cfg = read_run_config(args.adapter)
    made = not out.exists()
    check_writable_dir(out, "--output-dir")
    try:
        results, conversations, described = score(args, cfg)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refusal or Ctrl-C before any result leaves no empty folder behind
        raise
    table = markdown_table(results)
    record = {"adapter": os.fspath(args.adapter), "data": described} | results
    (out / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "eval.md").write_text(f"{described}: {len(conversations)} conversations\n\n{table}\n")
    print(f"{described}: {len(conversations)} conversations\n\n{table}\n")
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


def score(args: argparse.Namespace, cfg) -> tuple[dict, list, str]:
    """The data, the model, the scores: (results, the conversations scored, what they are)."""
    conversations, described = conversations_to_score(
        cfg, args.dataset, args.split, args.prompt_field, args.response_field, args.limit
    )
    model, tokenizer, cfg = load_for_inference(args.adapter, args.device, args.quant)
    check_context(args.max_new_tokens, model)  # before the loss pass, not after it
    results = compare(
        model,
        tokenizer,
        conversations,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        system_prompt=cfg.system_prompt,
    )
    return results, conversations, described


if __name__ == "__main__":
    sys.exit(main())
