"""A conversation -> token ids and labels, by the tokenizer's own chat template.

The ids are exactly what SFTTrainer trains on: the template renders the conversation to text, and
the text is encoded without adding any special token (the template writes its own). For Phi-3:

    <|user|>\\nThe Force is strong in you!<|end|>\\n<|assistant|>\\nStrong in you, the Force is.<|end|>\\n<|endoftext|>
    -> [32010, 450, 11004, 338, 4549, 297, 366, 29991, 32007,
        32001, 3767, 549, 297, 366, 29892, 278, 11004, 338, 29889, 32007, 32000]

Phi-3's markers swallow the newline after them (`<|end|>\\n` is the one token 32007), so text
positions and token positions do not line up: searching the decoded text for "<|assistant|>" to
build the mask goes wrong. Instead we find every boundary in token ids, by rendering prefixes of
the conversation with the same template. Nothing here knows Phi-3's strings, and the same code
masks other templates: SmolLM2's ChatML (`<|im_start|>assistant\n` ... `<|im_end|>\n`, where the
newline after the marker is a token of its own) is tested too.

Labels follow the Hugging Face convention: `labels[t]` is the token at position t, or -100 where
there is no loss; the model shifts them itself (position t predicts token t + 1).
"""

import hashlib
import json
from pathlib import Path

import transformers

from yoda_raw import tiny
from yoda_raw.config import TINY
from yoda_raw.errors import YodaError
from yoda_raw.errors import reason as error_reason
from yoda_raw.fetch import offline_hint
from yoda_raw.sources import looks_like_local_path

IGNORE = -100  # the label cross-entropy skips (torch's ignore_index default)


def load_tokenizer(source: str, trust_remote_code: bool = False) -> transformers.PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder or the Hub ("tiny" builds yoda_raw's tiny one).

    As in the tutorial, padding uses the unknown token (`pad_token = unk_token`), so that pad is
    never the end-of-text token the model must learn to emit. Padded positions get label -100
    and attention 0 anyway (see packing.Collator), so the choice only matters for readers of the ids.
    Without an unk token the tokenizer's pad token is kept, or else eos is used.
    """
    if source == TINY:
        tokenizer = tiny.build_tokenizer()
    else:
        path = Path(source).expanduser()
        if not path.exists() and looks_like_local_path(source):
            raise YodaError(f"tokenizer folder not found: {source}")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(path) if path.exists() else source, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as e:
            reason = error_reason(e)
            if path.exists():
                raise YodaError(f"cannot load a tokenizer from {source}: {reason}") from None
            raise YodaError(
                f"cannot load tokenizer {source!r} from the Hugging Face Hub ({reason}); "
                f"pass a local folder that holds it instead (--tokenizer PATH, or --model PATH){offline_hint(source)}"
            ) from None

    if not tokenizer.chat_template:
        raise YodaError(f"tokenizer {source} has no chat template; use an instruct/chat model's tokenizer")
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_sha256(tokenizer) -> str:
    """What identifies a tokenizer's ids: its whole definition (vocabulary, merges, normalisation,
    added tokens: tokenizer.json) where it has one, its chat template and its pad token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    identity = json.dumps([definition, tokenizer.chat_template, tokenizer.pad_token])
    return hashlib.sha256(identity.encode()).hexdigest()


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """Render messages with the chat template and encode the text, adding no special tokens."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 raises its own errors, and templates raise on roles they reject
        raise YodaError(f"the chat template cannot render these messages: {type(e).__name__}: {e}") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _not_stable(what: str) -> YodaError:
    return YodaError(
        f"the chat template is not prefix-stable ({what}), so assistant tokens cannot be located by "
        f"rendering prefixes of the conversation; use --train-on all, or a template that renders each "
        f"message the same way whatever follows it"
    )


def tokenize_conversation(tokenizer, messages: list[dict], train_on: str = "assistant") -> dict[str, list[int]]:
    """Token ids of a whole conversation, and labels that supervise only what the assistant says.

    The rule, driven only by the template:

    1. `ids` = render(messages). The tail the template adds after the last message (Phi-3's
       `<|endoftext|>`; ChatML adds none) is where render(messages) and render(messages, add_generation_prompt=True)
       part ways.
    2. Message k ends where render(messages[:k]), minus that tail, ends. Each such rendering
       must be a prefix of `ids` (the template is "prefix-stable"), else YodaError.
    3. An assistant message's content starts where render(messages[:k], add_generation_prompt=True)
       ends: that rendering is everything before the content, header included.
    4. Supervised: from the content start to the end of the message, stopping after the last
       special token in it (the end-of-turn marker: Phi-3's `<|end|>`, ChatML's `<|im_end|>`) so that a plain-text
       separator the template writes after the marker (ChatML's "\\n") is not trained on; when
       the message holds no special token, all of it. Plus the tail of step 1 when the
       conversation ends with an assistant message: the model learns to emit end-of-text.
    Everything else (system and user messages, headers) gets -100.

    Hand-worked, Phi-3 (ids from the module docstring):

        ids     [32010, 450, ..., 29991, 32007, 32001, 3767, 549, ..., 29889, 32007, 32000]
        labels  [-100,  -100, ..., -100, -100,  -100,  3767, 549, ..., 29889, 32007, 32000]
                 <|user|> The ...   !    <|end|> <|assistant|> Strong ...  .  <|end|> <|endoftext|>

    `train_on="all"` puts a loss on every token (labels == ids), as the tutorial's SFTTrainer does.
    """
    ids = render(tokenizer, messages)
    if train_on == "all":
        return {"input_ids": ids, "labels": list(ids)}

    # 1. The tail after the last message: what the template writes instead of a generation prompt.
    with_prompt = render(tokenizer, messages, add_generation_prompt=True)
    body_end = common_prefix_length(ids, with_prompt)
    tail = ids[body_end:]

    # 2. Where each message ends: ends[k] is the position just after message k (ends[0] = 0).
    ends = [0]
    for k in range(1, len(messages) + 1):
        prefix = render(tokenizer, messages[:k])
        end = len(prefix) - len(tail)
        if prefix[end:] != tail or prefix[:end] != ids[:end] or end <= ends[-1]:
            raise _not_stable(f"rendering the first {k} messages is not a prefix of rendering all {len(messages)}")
        ends.append(end)

    special_ids = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # 3. Content starts after the header, i.e. where the generation prompt leaves off.
        if i == 0:  # transformers refuses to render an empty conversation, so the header is unknown
            raise YodaError("the conversation opens with an assistant message; start it with a user or system message")
        header = render(tokenizer, messages[:i], add_generation_prompt=True)
        start = len(header)
        if header != ids[:start] or not ends[i] <= start <= ends[i + 1]:
            raise _not_stable(f"the generation prompt after {i} messages does not start message {i + 1}")

        # 4. Up to and including the last special token of the message (if it has one).
        stop = ends[i + 1]
        while stop > start and ids[stop - 1] not in special_ids:
            stop -= 1
        if stop == start:  # no special token: the whole message is the assistant's turn
            stop = ends[i + 1]
        labels[start:stop] = ids[start:stop]

    # The end-of-conversation tail is part of the last assistant turn.
    if messages[-1]["role"] == "assistant":
        labels[body_end:] = ids[body_end:]
    return {"input_ids": ids, "labels": labels}


def tokenize_conversations(tokenizer, conversations: list[list[dict]], train_on: str = "assistant") -> list[dict]:
    """tokenize_conversation for each conversation, in order; errors name the conversation (1-based)."""
    examples = []
    for number, messages in enumerate(conversations, start=1):
        try:
            examples.append(tokenize_conversation(tokenizer, messages, train_on))
        except YodaError as e:
            raise YodaError(f"conversation {number}: {e}") from None
    return examples
