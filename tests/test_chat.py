"""Assistant-only labels from the chat template, on the real Phi-3 tokenizer and the tiny one."""

import copy

import pytest
from tokenizers import AddedToken

from yoda_raw.chat import IGNORE, load_tokenizer, tokenize_conversation, tokenize_conversations
from yoda_raw.config import TINY_DATASET, Config
from yoda_raw.data import load_conversations
from yoda_raw.errors import YodaError

FORCE = [
    {"role": "user", "content": "The Force is strong in you!"},
    {"role": "assistant", "content": "Strong in you, the Force is."},
]
MULTI_TURN = [
    {"role": "system", "content": "You speak like Yoda."},
    {"role": "user", "content": "The Force is strong in you!"},
    {"role": "assistant", "content": "Strong in you, the Force is."},
    {"role": "user", "content": "Where is the ship?"},
    {"role": "assistant", "content": "In the swamp, the ship is. Hmm."},
]


def supervised_runs(tokenizer, example) -> list[str]:
    """Decoded text of each run of consecutive supervised tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE:
            assert label == token  # a supervised label is always its own token (the model shifts)
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_hand_worked_phi3(phi3_tokenizer):
    """One yoda exchange in Phi-3's template, ids and labels written out. The special tokens swallow
    the newline after them (no 13 follows 32010, 32007 or 32001), which is why masks are built
    from ids, never by searching decoded text."""
    example = tokenize_conversation(phi3_tokenizer, FORCE)
    #        <|user|> The  Force   is  strong in  you   !    <|end|>
    user = [32010, 450, 11004, 338, 4549, 297, 366, 29991, 32007]
    #            <|assistant|>
    header = [32001]
    #        Str   ong  in   you   ,      the  Force   is    .     <|end|> <|endoftext|>
    reply = [3767, 549, 297, 366, 29892, 278, 11004, 338, 29889, 32007, 32000]
    assert example["input_ids"] == user + header + reply
    assert example["labels"] == [-100] * 9 + [-100] + reply


def test_same_ids_as_sftTrainer_tokenization(phi3_tokenizer, yoda_conversations):
    """Our render-then-encode must equal apply_chat_template(tokenize=True), the call TRL makes."""
    for messages in yoda_conversations[:50]:
        expected = phi3_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert tokenize_conversation(phi3_tokenizer, messages)["input_ids"] == expected


def test_every_yoda_conversation(phi3_tokenizer, yoda_conversations):
    """For all 720: the supervised tokens decode to exactly the reply + <|end|><|endoftext|>,
    they are one run that starts right after <|assistant|>, and nothing before it is supervised."""
    assistant_id = phi3_tokenizer.convert_tokens_to_ids("<|assistant|>")
    for messages in yoda_conversations:
        example = tokenize_conversation(phi3_tokenizer, messages)
        ids, labels = example["input_ids"], example["labels"]
        start = ids.index(assistant_id) + 1
        assert labels[:start] == [IGNORE] * start
        assert labels[start:] == ids[start:]
        assert phi3_tokenizer.decode(labels[start:]) == messages[1]["content"] + "<|end|><|endoftext|>"


def test_every_yoda_conversation_tiny(tiny_tokenizer, yoda_conversations):
    """The same on the tiny tokenizer, whose vocabulary has never seen most of these words."""
    for messages in yoda_conversations:
        example = tokenize_conversation(tiny_tokenizer, messages)
        assert supervised_runs(tiny_tokenizer, example) == [messages[1]["content"] + "<|end|><|endoftext|>"]


def test_every_tiny_conversation(tiny_tokenizer):
    """The shipped tiny set on the tiny tokenizer: runs with no shared data at all."""
    for messages in load_conversations(TINY_DATASET):
        example = tokenize_conversation(tiny_tokenizer, messages)
        assert supervised_runs(tiny_tokenizer, example) == [messages[1]["content"] + "<|end|><|endoftext|>"]


@pytest.mark.parametrize("name", ["phi3_tokenizer", "tiny_tokenizer"])
def test_multi_turn_with_system(name, request):
    """Each assistant turn is supervised with its <|end|>; end-of-text only after the last turn;
    system, user and headers are not."""
    tokenizer = request.getfixturevalue(name)
    example = tokenize_conversation(tokenizer, MULTI_TURN)
    assert supervised_runs(tokenizer, example) == [
        "Strong in you, the Force is.<|end|>",
        "In the swamp, the ship is. Hmm.<|end|><|endoftext|>",
    ]


@pytest.mark.parametrize("name", ["phi3_tokenizer", "tiny_tokenizer"])
def test_conversation_ending_with_user(name, request):
    """End-of-text closes the conversation, not an assistant turn here: it must stay masked."""
    tokenizer = request.getfixturevalue(name)
    example = tokenize_conversation(tokenizer, MULTI_TURN[:4])
    assert supervised_runs(tokenizer, example) == ["Strong in you, the Force is.<|end|>"]
    assert example["labels"][-1] == IGNORE


def test_train_on_all(tiny_tokenizer):
    example = tokenize_conversation(tiny_tokenizer, MULTI_TURN, train_on="all")
    assert example["labels"] == example["input_ids"]
    # A misspelt choice is refused where options are read, once, for every command (config.py).
    with pytest.raises(YodaError, match=r"^--train-on must be one of assistant, all, got 'assistants'$"):
        Config(train_on="assistants")


def with_template(tokenizer, template: str, extra_tokens: list[str] = ()):
    tokenizer = copy.deepcopy(tokenizer)
    if extra_tokens:
        added = [AddedToken(t, rstrip=False, normalized=False, special=True) for t in extra_tokens]
        tokenizer.add_special_tokens({"additional_special_tokens": added})
    tokenizer.chat_template = template
    return tokenizer


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chatml_separator_not_supervised(tiny_tokenizer):
    """In ChatML the newline after <|im_end|> is a separator before the next header: keep the
    end-of-turn token, leave the newline out (and there is no end-of-text tail)."""
    tokenizer = with_template(tiny_tokenizer, CHATML, ["<|im_start|>", "<|im_end|>"])
    example = tokenize_conversation(tokenizer, MULTI_TURN)
    assert supervised_runs(tokenizer, example) == [
        "Strong in you, the Force is.<|im_end|>",
        "In the swamp, the ship is. Hmm.<|im_end|>",
    ]
    assert tokenizer.decode(example["input_ids"][-1:]) == "\n"  # the last token exists, masked
    assert example["labels"][-1] == IGNORE


def test_plain_text_template_supervises_whole_turn(tiny_tokenizer):
    """With no special token in the turn, the whole rendered turn is the assistant's (documented rule)."""
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tokenizer = with_template(tiny_tokenizer, template)
    example = tokenize_conversation(tokenizer, FORCE)
    assert supervised_runs(tokenizer, example) == ["Strong in you, the Force is.\n"]


def test_template_that_is_not_prefix_stable(tiny_tokenizer):
    """A template whose rendering of the first messages changes when more follow (here: a count at
    the top) cannot be masked by prefixes: it must raise, not mask the wrong tokens."""
    template = (
        "{{ messages|length }} messages\n"
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    tokenizer = with_template(tiny_tokenizer, template)
    with pytest.raises(YodaError, match="not prefix-stable"):
        tokenize_conversation(tokenizer, FORCE)
    # All-token loss needs no boundaries, so it still works.
    assert tokenize_conversation(tokenizer, FORCE, train_on="all")["labels"]


def test_template_that_hides_earlier_turns(tiny_tokenizer):
    """Like reasoning-model templates that drop old assistant turns: not prefix-stable either."""
    template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    tokenizer = with_template(tiny_tokenizer, template)
    with pytest.raises(YodaError, match="not prefix-stable"):
        tokenize_conversation(tokenizer, MULTI_TURN)


def test_tokenize_conversations_names_the_conversation(tiny_tokenizer):
    template = (
        "{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('boom') }}{% endif %}{% endfor %}"
    )
    tokenizer = with_template(tiny_tokenizer, tiny_tokenizer.chat_template + template)
    broken = [{"role": "user", "content": "boom"}, FORCE[1]]
    with pytest.raises(YodaError, match="^conversation 2: .*boom"):
        tokenize_conversations(tokenizer, [FORCE, broken])


def test_conversation_opening_with_assistant(tiny_tokenizer):
    """transformers cannot render an empty prefix, so the header of a first assistant turn is unknown."""
    with pytest.raises(YodaError, match="opens with an assistant message"):
        tokenize_conversation(tiny_tokenizer, FORCE[1:])


def test_template_error_is_a_yoda_error(tiny_tokenizer):
    tokenizer = with_template(tiny_tokenizer, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(YodaError, match="roles must alternate"):
        tokenize_conversation(tokenizer, FORCE)


# --- load_tokenizer ----------------------------------------------------------------------------


def test_load_tokenizer_pads_with_unk_as_the_tutorial(phi3_tokenizer):
    assert (phi3_tokenizer.pad_token, phi3_tokenizer.pad_token_id) == ("<unk>", 0)
    assert phi3_tokenizer.eos_token_id == 32000 and len(phi3_tokenizer) == 32011


def test_load_tiny_tokenizer(tiny_tokenizer):
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.pad_token_id) == ("<unk>", 0)
    assert tiny_tokenizer.eos_token == "<|endoftext|>" and tiny_tokenizer.chat_template


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(YodaError, match="^tokenizer folder not found: ./nope$"):
        load_tokenizer("./nope")
    with pytest.raises(YodaError, match="cannot load tokenizer 'someone/some-model' from the Hugging Face Hub.*folder"):
        load_tokenizer("someone/some-model")
    with pytest.raises(YodaError, match="cannot load a tokenizer from"):
        load_tokenizer(str(tmp_path))  # a folder, but no tokenizer files in it
