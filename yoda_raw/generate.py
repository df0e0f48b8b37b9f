"""Generation: a trained adapter turns English into Yoda speak.

    python -m yoda_raw.generate --adapter out-tiny "The Force is strong in you!"
    printf 'I am your father.\\nDo or do not.\\n' | python -m yoda_raw.generate --adapter out-tiny
    python -m yoda_raw.generate --adapter out --merge out-merged     # one model, no peft needed

What happens to one sentence, in order:
1. the chat template renders it as a user turn (after the run's --system-prompt, if it had one)
   plus the generation prompt, exactly as in training. Phi-3: `<|user|>` sentence `<|end|>`
   `<|assistant|>`; SmolLM2 (ChatML): `<|im_start|>system` ... `<|im_end|>` `<|im_start|>user`
   sentence `<|im_end|>` `<|im_start|>assistant`;
2. prompts of a batch are padded on the LEFT, so every prompt ends at the last column and the first
   new token of every row is predicted from its own last prompt token (right padding would make
   short prompts continue after pad tokens);
3. `model.generate` decodes greedily (or samples, with --temperature) with the KV cache, and stops
   a row at the first end token: the eos ids, the token that closes an assistant turn and the one
   that would open a new one, all read from the template (Phi-3: `<|endoftext|>`, `<|end|>`,
   `<|assistant|>`; SmolLM2: `<|im_end|>`, `<|im_start|>`);
4. only the new tokens are decoded: the prompt is cut off at its (shared) width.

The base model is rebuilt the way the adapter was trained (run_config.json: model, init, seed,
quant, precision, system prompt), then the adapter is applied with peft.
"""

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import safetensors
import torch
import transformers

from yoda_raw.chat import common_prefix_length, load_tokenizer, render, tokenizer_sha256
from yoda_raw.checkpoint import ADAPTER_FILE
from yoda_raw.cli import ArgumentParser, run_command
from yoda_raw.config import Config, read_json
from yoda_raw.data import with_system_prompt
from yoda_raw.errors import YodaError
from yoda_raw.errors import reason as error_reason
from yoda_raw.output import WRITE_ERRORS, check_no_file_in_the_way
from yoda_raw.precision import choose_precision

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "run_config.json"
SAMPLE_SENTENCE = "The Force is strong in you!"  # the tutorial's example


# --- loading ------------------------------------------------------------------------------------


def read_run_config(adapter_dir: str | os.PathLike) -> Config:
    """The Config a training run saved next to its adapter (unknown keys, e.g. from a newer
    yoda_raw, are dropped). Raises YodaError when the folder is not a yoda_raw adapter."""
    path = Path(adapter_dir)
    if not path.is_dir():
        raise YodaError(f"--adapter {adapter_dir}: no such folder; pass the --output-dir of a training run")
    if not (path / ADAPTER_CONFIG).is_file():
        raise YodaError(f"--adapter {adapter_dir}: not an adapter (no {ADAPTER_CONFIG})")
    if not (path / RUN_CONFIG).is_file():
        raise YodaError(f"--adapter {adapter_dir}: no {RUN_CONFIG}, so the base model it was trained on is unknown")
    # Without its weights peft would take the folder's name for a Hub id; a truncated file fails deep in safetensors.
    weights = path / ADAPTER_FILE
    if not weights.is_file():
        raise YodaError(f"--adapter {adapter_dir}: no {ADAPTER_FILE}; pass a finished run's --output-dir")
    try:
        safetensors.safe_open(weights, "pt").keys()  # reads the header, checks the file is as long as it says
    except (OSError, safetensors.SafetensorError):
        raise YodaError(
            f"--adapter {adapter_dir}: {ADAPTER_FILE} is damaged (cut short?); use a checkpoint-N folder, or retrain"
        ) from None
    fix = "it is written by training: retrain, or restore the file from a backup"
    values = read_json(path / RUN_CONFIG, fix)
    if "model" not in values:  # else the default (Phi-3 from the Hub) would be taken for the base, silently
        raise YodaError(f"{path / RUN_CONFIG} has no 'model', so the base model it was trained on is unknown; {fix}")
    try:
        return Config.from_dict(values)
    except YodaError as err:  # a hand-edited value: say which file holds it
        raise YodaError(f"{path / RUN_CONFIG}: {err}; {fix}") from None


def load_tokenizer_for(adapter_dir: str | os.PathLike, cfg: Config):
    """The tokenizer saved with the adapter; a checkpoint folder has none, so then the run's source.
    Loaded by chat.load_tokenizer, as in training (same pad token)."""
    saved = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(
        str(adapter_dir) if saved else cfg.tokenizer_source, trust_remote_code=cfg.trust_remote_code
    )
    # The source may hold another tokenizer by now; the adapter would then read other ids than it trained on.
    if not saved and cfg.tokenizer_sha256 not in (None, tokenizer_sha256(tokenizer)):
        raise YodaError(
            f"--adapter {adapter_dir}: the tokenizer {cfg.tokenizer_source} is not the one it was trained with; "
            "restore it, or use the finished run's output folder (it holds its own copy)"
        )
    return tokenizer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """--device as a torch.device (None: cuda if there is one), or YodaError if there is no such device here."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise YodaError(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise YodaError(f"--device {name}: no CUDA GPU found; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise YodaError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise YodaError(f"--device {name}: not supported here; use cpu, cuda or cuda:N")
    return device


def load_for_inference(
    adapter_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    quant: str | None = None,
    dequantize_base: bool = False,
):
    """(model, tokenizer, cfg): the base model rebuilt as trained, with the adapter on top, in eval mode.

    `quant` overrides the run's --quant ("nf4" or "none"). `dequantize_base=True` turns a 4-bit
    base into full-precision weights equal to its dequantized NF4 values (the weights the adapter
    was trained against) before the adapter is applied; `merge` needs that.
    """
    # peft and the model stage (which loads bitsandbytes) take seconds to import: importing them
    # here lets a wrong --adapter or option be reported at once, before that wait.
    from peft import PeftModel

    from yoda_raw.identity import base_model_identity, check_base_model
    from yoda_raw.model import load_base_model, load_model_config

    trained = read_run_config(adapter_dir)
    # (replace() leaves the recorded identities out: they are read from `trained`.)
    cfg = trained if quant is None else dataclasses.replace(trained, quant=quant)
    device = resolve_device(device)
    precision = choose_precision(cfg.precision, device)
    tokenizer = load_tokenizer_for(adapter_dir, trained)
    if trained.base_model_id is not None:  # adapters of earlier versions recorded none: nothing to check
        check_base_model(
            trained.base_model_id, base_model_identity(cfg, load_model_config(cfg, len(tokenizer))), cfg.model,
            f"--adapter {adapter_dir}", "restore the weights it was trained on, or retrain on these",
        )  # fmt: skip
    base = load_base_model(cfg, precision, device, vocab_size=len(tokenizer))
    if dequantize_base and cfg.quant == "nf4":
        base = base.dequantize()  # each Linear4bit -> nn.Linear holding dequantize_4bit(weight)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, tokenizer, cfg


# --- prompts and end tokens ---------------------------------------------------------------------


def prompt_ids(tokenizer, sentence: str, system_prompt: str | None = None) -> list[int]:
    """The (system prompt and) user turn and the generation prompt, as in training.
    Phi-3: `<|user|>` ... `<|end|>` `<|assistant|>`."""
    # data.with_system_prompt and chat.render: the same conversation and the same rendering and
    # encoding as the training rows, so the prompt's ids are exactly those the model learned to continue.
    conversation = with_system_prompt([{"role": "user", "content": sentence}], system_prompt)
    return render(tokenizer, conversation, add_generation_prompt=True)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad on the left so that all prompts end in the last column; attention 0 on the padding.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids), torch.tensor(mask)  # (B, T), (B, T)


def template_markers(tokenizer) -> list[int]:
    """Special tokens the chat template puts around an assistant answer: the one that opens it
    (what add_generation_prompt adds) and the one that closes it. Phi-3: [32001, 32007]
    (`<|assistant|>`, `<|end|>`); SmolLM2: [1, 2] (`<|im_start|>`, `<|im_end|>`).

    Found by comparing token ids of renderings, never by searching text:
    - opening: the first id where `user turn + generation prompt` departs from `user turn` alone;
    - closing: the first id of what two exchanges with different answers have in common at the end.
    Either is kept only if it is an added special token.
    """
    user = [{"role": "user", "content": "Hi"}]
    prompt, no_prompt = render(tokenizer, user, add_generation_prompt=True), render(tokenizer, user)
    same = common_prefix_length(prompt, no_prompt)
    opening = prompt[same : same + 1]  # Phi-3: [<|assistant|>]
    yes = render(tokenizer, user + [{"role": "assistant", "content": "Yes"}])
    no = render(tokenizer, user + [{"role": "assistant", "content": "No."}])
    same = common_prefix_length(yes[::-1], no[::-1])
    closing = yes[len(yes) - same :][:1]  # Phi-3: [<|end|>] of [<|end|>, <|endoftext|>]
    special = set(tokenizer.added_tokens_decoder)  # ids of added tokens (chat markers, eos, ...)
    return [token for token in opening + closing if token in special]


def end_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Where an answer ends: eos (tokenizer and generation config) and the template's markers.

    On Phi-3 this is [32000, 32001, 32007]: `<|endoftext|>`, `<|assistant|>`, `<|end|>`, the
    same list as its generation_config.json; on SmolLM2 [1, 2] (`<|im_start|>`, `<|im_end|>`,
    which is also its eos); on the tiny tokenizer [3, 4, 10].
    """
    ids = set(template_markers(tokenizer))
    for eos in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if eos is not None:
            ids |= {eos} if isinstance(eos, int) else set(eos)
    return sorted(ids)


def cut_at_end(ids: list[int], end_ids) -> list[int]:
    """Keep the tokens up to and including the first end token (what follows is padding).

    >>> cut_at_end([5, 6, 10, 3, 0], end_ids=[3, 10])
    [5, 6, 10]
    >>> cut_at_end([5, 6, 7], end_ids=[3, 10])  # ran into max_new_tokens: no end token
    [5, 6, 7]
    """
    for i, token in enumerate(ids):
        if token in end_ids:
            return ids[: i + 1]
    return ids


# --- generation ---------------------------------------------------------------------------------


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    sentences: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> list[list[int]]:
    """The new token ids for each sentence, ending with the end token that stopped it (if any).

    The model is put in eval mode (no dropout; the KV cache works with gradient checkpointing on)
    and given back in the mode it came in, so a training loop can call this between steps.
    """
    end_ids = end_token_ids(tokenizer, getattr(model, "generation_config", None))
    device = next(model.parameters()).device
    context = getattr(model.config, "max_position_embeddings", None)
    if temperature > 0:
        # top_k=0: no top-k cut (generate's default is 50); only --temperature and --top-p shape the draw.
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    else:
        sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # greedy: argmax
    if seed is not None:
        transformers.set_seed(seed)
    was_training = model.training
    model.eval()
    try:
        results = []
        for start in range(0, len(sentences), batch_size):
            prompts = [prompt_ids(tokenizer, s, system_prompt) for s in sentences[start : start + batch_size]]
            check_fits(prompts, max_new_tokens, context, first_number=start + 1)
            input_ids, attention_mask = left_pad(prompts, tokenizer.pad_token_id)
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                eos_token_id=end_ids,  # a row stops at the first of these; finished rows get pad_token_id
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,  # training sets config.use_cache=False; generation wants the KV cache
                **sampling,
            )  # (B, T + new)
            new = generated[:, input_ids.shape[1] :].tolist()  # only the new tokens; a host sync
            results += [cut_at_end(row, end_ids) for row in new]
    finally:
        model.train(was_training)
    return results


def check_context(max_new_tokens: int, model) -> None:
    """Refuse a --max-new-tokens no prompt fits beside, before any slow pass over the data."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and max_new_tokens >= context:
        raise YodaError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of {context} "
            f"tokens; pass at most {context - 1} (the default, 64, is enough for a sentence)"
        )


def check_fits(prompts: list[list[int]], max_new_tokens: int, context: int | None, first_number: int = 1) -> None:
    """Past its context a model computes garbage (or fails on position ids): refuse such a sentence."""
    for number, prompt in enumerate(prompts, start=first_number):
        if context is not None and len(prompt) + max_new_tokens > context:
            raise YodaError(
                f"sentence {number} is {len(prompt)} tokens with the chat template; with --max-new-tokens "
                f"{max_new_tokens} that is more than the model's context of {context} tokens: shorten it"
            )


def decode_answer(tokenizer, ids: list[int], end_ids) -> str:
    """Text of the new tokens without the end token; on one line (stdin mode prints one per input)."""
    if ids and ids[-1] in end_ids:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return " ".join(text.split())


def translate(
    model,
    tokenizer,
    sentences: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> list[str]:
    """English sentences -> Yoda speak, one string each (greedy unless temperature > 0).
    `system_prompt`: the one the adapter was trained with (run_config.json's system_prompt).

    >>> translate(model, tokenizer, ["The Force is strong in you!"])  # doctest: +SKIP
    ['Strong in you, the Force is. Yes, hrrmmm.']
    """
    check_sampling(max_new_tokens, temperature, top_p, batch_size)
    rows = generate_ids(
        model, tokenizer, sentences, max_new_tokens, temperature, top_p, seed, batch_size, system_prompt
    )
    end_ids = end_token_ids(tokenizer, getattr(model, "generation_config", None))
    return [decode_answer(tokenizer, ids, end_ids) for ids in rows]


def check_sampling(
    max_new_tokens: int, temperature: float, top_p: float, batch_size: int, seed: int | None = None
) -> None:
    checks = [
        (max_new_tokens >= 1, f"--max-new-tokens must be at least 1, got {max_new_tokens}"),
        (
            math.isfinite(temperature) and temperature >= 0,
            f"--temperature must be 0 (greedy) or a finite number above it, got {temperature}",
        ),
        # The same range as run.py's --seed (numpy's, which set_seed also seeds).
        (seed is None or 0 <= seed < 2**32, f"--seed must be in [0, 2**32), got {seed}"),
        (0 < top_p <= 1, f"--top-p must be in (0, 1], got {top_p}"),
        (batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise YodaError(message)


# --- merging ------------------------------------------------------------------------------------


def merge(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, device: str | torch.device | None = None) -> Path:
    """Write base + adapter as one ordinary model (no peft needed to load it); returns the folder.

    Merging into 4-bit weights rounds: peft would dequantize each weight, add (alpha/r) B A, and
    quantize the sum back to NF4, whose levels are far apart compared with most of the update,
    so much of the fine-tuning would be rounded away. Instead the 4-bit base is dequantized
    first, exactly to the weights the adapter was trained against, and the update is added in
    full precision. The merged model is therefore full size (7.6 GB in bf16 for Phi-3-mini).
    """
    out = Path(out_dir).expanduser()
    check_no_file_in_the_way(out, f"--merge {out_dir}", "choose a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise YodaError(
            f"--merge {out_dir}: is not empty (files there would be replaced); choose a new or empty folder"
        )
    # Written into a temporary folder beside it, then renamed into place: a full disk or a crash
    # leaves no half model that blocks a retry. Made now, before the slow load: a place that cannot
    # be written to is found at once. Two merges into one folder: the rename lets one of them win.
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.absolute().parent))
    except OSError as err:
        raise YodaError(
            f"--merge {out_dir}: cannot write there ({err.strerror}); choose a folder you can write to"
        ) from None
    try:
        model, tokenizer, cfg = load_for_inference(adapter_dir, device, dequantize_base=True)
        merged = model.merge_and_unload()  # W <- W + (alpha / r) B A in every adapted layer; LoRA removed
        merged.config.use_cache = True  # a deployed model generates
        # So that a plain `merged.generate(...)` stops where translate() does (the end-of-turn marker included).
        merged.generation_config.eos_token_id = end_token_ids(tokenizer, merged.generation_config)
        try:
            merged.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            (partial / RUN_CONFIG).write_text(cfg.to_json())
        except WRITE_ERRORS as err:  # a full disk, no permission: what saving can raise, nothing broader
            reason = error_reason(err)
            raise YodaError(
                f"--merge {out_dir}: could not write the merged model ({reason}); nothing was left there: "
                "free some space and run it again"
            ) from None
        try:
            os.rename(partial, out)  # replaces an empty folder; fails on one that another merge filled
        except OSError:
            raise YodaError(
                f"--merge {out_dir}: another merge wrote it meanwhile; use that one, or merge into a new folder"
            ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m yoda_raw.generate",
        description="Translate English into Yoda speak with a trained adapter. Sentences come from the "
        "command line, or from stdin one per line (one output line per input line).",
    )
    parser.add_argument("sentences", nargs="*", help="Sentences to translate (default: read stdin).")
    parser.add_argument("--adapter", required=True, help="Output folder of a training run (adapter + run_config.json).")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Most tokens generated per sentence.")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default). >0: sample.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass (with --temperature > 0).")
    parser.add_argument("--seed", type=int, default=None, help="Seed for sampling.")
    parser.add_argument("--batch-size", type=int, default=16, help="Sentences per generate call (left-padded).")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available).")
    parser.add_argument(
        "--quant",
        choices=["nf4", "none"],
        default=None,
        help="Override the run's --quant for the base model (default: as trained).",
    )
    parser.add_argument(
        "--merge",
        metavar="OUT_DIR",
        default=None,
        help="Write base + adapter merged into one full-precision model instead of translating "
        "(merging into 4-bit weights would round the update away).",
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks.")
    return parser.parse_args(argv)


def read_sentences(args: argparse.Namespace, stdin) -> list[str]:
    if args.sentences:
        return list(args.sentences)
    if stdin is None or stdin.isatty():
        raise YodaError("no sentences: pass them as arguments, or one per line on stdin")
    try:
        # Bytes, decoded strictly: a text stdin may decode with surrogateescape (under the C locale),
        # which hides another encoding until the tokenizer chokes on it.
        buffer = getattr(stdin, "buffer", None)
        lines = (buffer.read().decode("utf-8-sig") if buffer is not None else stdin.read()).splitlines()
    except UnicodeDecodeError as err:
        raise YodaError(f"stdin is not UTF-8 text (byte {err.start}); convert it, e.g. with iconv -t UTF-8") from None
    if not any(line.strip() for line in lines):
        raise YodaError("no sentences: stdin was empty")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m yoda_raw.generate`: a mistake in the input is one line `error: ...`, status 2 (cli.py)."""
    return run_command(generate_command, argv)


def generate_command(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.merge:
        out = merge(args.adapter, args.merge, args.device)
        print(f"merged {args.adapter} into {out} (full precision: merging into 4-bit weights would round)")
        return 0
    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.batch_size, args.seed)
    read_run_config(args.adapter)  # a wrong folder is reported before any waiting on stdin
    sentences = read_sentences(args, sys.stdin)
    model, tokenizer, cfg = load_for_inference(args.adapter, args.device, args.quant)
    # Blank input lines give blank output lines, so output line i answers input line i.
    todo = [i for i, s in enumerate(sentences) if s.strip()]
    answers = translate(
        model,
        tokenizer,
        [sentences[i].strip() for i in todo],
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.seed,
        args.batch_size,
        cfg.system_prompt,
    )
    lines = [""] * len(sentences)
    for i, answer in zip(todo, answers, strict=True):
        lines[i] = answer
    for line in lines:
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
