"""Everything `--preset tiny` needs that is not a file: a tokenizer and a model shape.

The tiny preset runs the whole pipeline offline on a CPU in a minute or two. Nothing is downloaded:

- `build_tokenizer()` trains a small byte-level BPE (512 tokens) on the ~50 pairs of
  `tiny_yoda.jsonl`, in about 20 ms, and dresses it like Phi-3's tokenizer: the same special
  tokens, the same unk/bos/eos/pad settings, the same chat template. So chat.py, packing.py and
  the training loop run exactly the code they run for the real model.
- `model_config(vocab_size)` is a Phi-3 architecture with a few hundred thousand parameters.

Byte-level means any text encodes, even text the BPE never saw (it falls back to single bytes).
Training is deterministic: the same dataset file gives the same vocabulary in every process.
"""

import json

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from yoda_raw.config import TINY_DATASET

# Phi-3's added tokens in Phi-3's order, so that their ids here are small and fixed (0..13).
# In Phi-3 the chat markers have rstrip=True: the token swallows the whitespace after it, so
# "<|end|>\n" is the single token <|end|>. We copy that, so the tiny tokenizer renders a
# conversation into the same token pattern as the real one.
SPECIAL_TOKENS = [
    # (content, rstrip)
    ("<unk>", False),
    ("<s>", False),
    ("</s>", True),
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", True),
]
UNK_ID = 0  # <unk>
BOS_ID = 1  # <s>
EOS_ID = 3  # <|endoftext|>: eos, and pad in Phi-3's config
VOCAB_SIZE = 512

# Copied verbatim from Phi-3-mini-4k-instruct's tokenizer_config.json (current Hub revision).
# Note the end: with add_generation_prompt=False the conversation is closed by eos_token.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _training_text(path: str = TINY_DATASET) -> list[str]:
    """The English and Yoda sentences of the tiny dataset, one string each."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["sentence"], row["translation_extra"]]
    return texts


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A 512-token byte-level BPE with Phi-3's special tokens and chat template.

    The markers swallow the newline after them, as in Phi-3 ("Ġ" is how byte-level BPE shows a space):

    >>> tok = build_tokenizer()
    >>> tok.apply_chat_template([{"role": "user", "content": "The stars are bright."}], tokenize=False)
    '<|user|>\\nThe stars are bright.<|end|>\\n<|endoftext|>'
    >>> tok.convert_ids_to_tokens(tok(_, add_special_tokens=False)["input_ids"])
    ['<|user|>', 'The', 'Ġst', 'ar', 's', 'Ġare', 'Ġbr', 'ight', '.', '<|end|>', '<|endoftext|>']
    """
    # Byte-level: text is first mapped to bytes, each byte to one of 256 base symbols, so
    # every string has an encoding and no token is ever <unk>.
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = [AddedToken(text, rstrip=rstrip, normalized=False, special=True) for text, rstrip in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,  # given first, so they get ids 0..13 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_text(), trainer)

    # The same settings as Phi-3's tokenizer_config.json: no BOS added when encoding, eos and pad
    # are <|endoftext|>. (load_tokenizer in chat.py then sets pad to unk, as the tutorial does.)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        padding_side="left",  # Phi-3's; our collator pads on the right itself
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def model_config(vocab_size: int) -> transformers.Phi3Config:
    """A Phi-3 architecture small enough to train on a CPU in seconds (~0.2M parameters at 512 tokens).

    Same building blocks as Phi-3-mini (fused qkv_proj and gate_up_proj, RMSNorm, rotary
    positions), so LoRA targets and gradient checkpointing work the same; only the sizes differ.
    """
    return transformers.Phi3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=256,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,  # as in Phi-3's config.json (pad = eos = <|endoftext|>)
        tie_word_embeddings=False,
        # The LM head stays frozen and random. With Phi-3's 0.02 its logits could never exceed
        # ~1.3 in size (0.02 * 64 after the final norm), a ceiling near uniform loss that no
        # adapter could train past; 0.1 lets the tiny preset's loss fall from ~6 to ~2.
        initializer_range=0.1,
    )
