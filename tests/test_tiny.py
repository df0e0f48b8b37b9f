"""The tiny tokenizer and model shape: offline, deterministic, and shaped like Phi-3's."""

import json

import torch
import transformers

from yoda_raw import tiny
from yoda_raw.config import TINY_DATASET

MESSAGES = [
    {"role": "system", "content": "Speak like Yoda."},
    {"role": "user", "content": "The Force is strong in you!"},
    {"role": "assistant", "content": "Strong in you, the Force is."},
]


def test_build_is_deterministic():
    """Catches a vocabulary trained from unordered data (differs run to run)."""
    a = tiny.build_tokenizer()
    b = tiny.build_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == tiny.VOCAB_SIZE


def test_special_tokens_like_phi3():
    tok = tiny.build_tokenizer()
    for token_id, (text, _) in enumerate(tiny.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(text) == token_id
    assert (tok.unk_token, tok.bos_token) == ("<unk>", "<s>")
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"  # as in Phi-3's tokenizer_config.json
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (tiny.UNK_ID, tiny.BOS_ID, tiny.EOS_ID)
    # Like Phi-3, encoding adds no BOS (the template writes every special token itself).
    assert tok("Hello")["input_ids"] == tok("Hello", add_special_tokens=False)["input_ids"]
    assert tiny.BOS_ID not in tok("Hello")["input_ids"]


def test_template_renders_like_phi3():
    """The template is Phi-3's, and the markers swallow the newline after them as Phi-3's do."""
    tok = tiny.build_tokenizer()
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|system|>\nSpeak like Yoda.<|end|>\n<|user|>\nThe Force is strong in you!<|end|>\n"
        "<|assistant|>\nStrong in you, the Force is.<|end|>\n<|endoftext|>"
    )
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|>\n<|assistant|>\n")
    tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    assert "\n" not in "".join(t for t in tokens if not t.startswith("<|"))  # no newline token left
    assert tokens[-3:] == [".", "<|end|>", "<|endoftext|>"]


def test_same_special_token_pattern_as_real_phi3(phi3_tokenizer):
    """Where the real tokenizer puts a special token, the tiny one puts the same one."""
    tok = tiny.build_tokenizer()

    def specials(t):
        ids = t.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)
        return [x for x in t.convert_ids_to_tokens(ids) if x.startswith("<|")]

    assert specials(tok) == specials(phi3_tokenizer)
    assert tok.chat_template == phi3_tokenizer.chat_template


def test_byte_level_encodes_any_text():
    """Text never seen in training (accents, CJK, emoji, U+FFFD) round-trips without <unk>."""
    tok = tiny.build_tokenizer()
    text = "Ça va? 你好 🐸 don\ufffdt  \t tabs\nand lines"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tiny.UNK_ID not in ids
    assert tok.decode(ids) == text


def test_tiny_dataset_is_well_formed():
    rows = [json.loads(line) for line in open(TINY_DATASET, encoding="utf-8")]
    assert 40 <= len(rows) <= 80
    assert all(set(row) == {"sentence", "translation", "translation_extra"} for row in rows)
    assert all(row["translation_extra"].startswith(row["translation"]) for row in rows)
    assert any(row["translation_extra"] != row["translation"] for row in rows)
    assert len({row["sentence"] for row in rows}) == len(rows)


def test_model_config_runs_a_forward_and_backward():
    """The config must agree with the tokenizer (vocab, pad/eos ids) and give a working model."""
    tok = tiny.build_tokenizer()
    config = tiny.model_config(len(tok))
    assert config.vocab_size == len(tok)
    assert (config.pad_token_id, config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert config.tie_word_embeddings is False
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config)
    ids = torch.tensor([tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=False)])  # (1, T)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
