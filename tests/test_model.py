"""The model stage: parameter counts on the real architecture, freezing, LoRA placement."""

from pathlib import Path

import pytest
import torch
import transformers

from yoda_raw.config import Config
from yoda_raw.errors import YodaError
from yoda_raw.model import add_lora, parameter_counts, parameter_line


def test_phi3_mini_counts_match_the_tutorial():
    """The tutorial prints 12.58M trainable of 3833.66M (0.33%). Built on the meta device: no
    memory, no download. Catches LoRA on the wrong modules, a wrong rank, or the LM head adapted."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.Phi3Config())
    model = add_lora(model, Config(gradient_checkpointing=False))
    trainable, total = parameter_counts(model)
    assert (trainable, total) == (12_582_912, 3_833_662_464)
    assert parameter_line(model) == "12.58M trainable of 3833.66M parameters (0.33%)"


def test_only_lora_weights_train(tiny_model):
    """Catches a base left unfrozen (the whole model would train and the optimizer state explode)."""
    model = add_lora(tiny_model, Config(gradient_checkpointing=False))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    targets = {n.split(".")[-4] for n in trainable}  # ...o_proj.lora_A.default.weight
    assert targets == {"o_proj", "qkv_proj", "gate_up_proj", "down_proj"}


def test_unknown_lora_target_names_the_real_ones(tiny_model):
    with pytest.raises(YodaError, match=r"--lora-targets q_proj: no such module.*qkv_proj"):
        add_lora(tiny_model, Config(lora_targets=["q_proj"], gradient_checkpointing=False))


def test_random_model_has_no_zero_embedding_row(tiny_tokenizer):
    """Random init zeroes the padding token's embedding row; on full-size Phi-3 a row starting with
    that token (<|endoftext|>) then overflowed RMSNorm's backward to NaN by layer ~16 on the H200.
    Catches the re-initialisation of that row being lost: every row must be non-zero."""
    from yoda_raw import tiny
    from yoda_raw.model import random_model

    config = tiny.model_config(len(tiny_tokenizer))
    model = random_model(config, seed=0, dtype=torch.float32)
    embeddings = model.get_input_embeddings()
    assert embeddings.padding_idx == config.pad_token_id  # the row that init zeroes
    assert (embeddings.weight.abs().sum(dim=1) > 0).all()


SMALL_LLAMA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def test_default_lora_targets_fit_the_architecture():
    """The default (no --lora-targets) is every linear layer but the head, read from the config's
    skeleton: on Phi-3 exactly the tutorial's four, on a Llama-style model (SmolLM2) the seven
    attention and MLP projections. Catches the head being adapted, or Phi-3's names forced on Llama."""
    from yoda_raw.model import choose_lora_targets, skeleton

    phi3 = skeleton(transformers.Phi3Config())  # full size, but on the meta device: no memory
    assert set(choose_lora_targets([], phi3, "phi3")) == {"o_proj", "qkv_proj", "gate_up_proj", "down_proj"}
    llama = skeleton(transformers.LlamaConfig(**SMALL_LLAMA))
    assert choose_lora_targets([], llama, "llama") == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def test_wrong_lora_target_is_found_before_the_weights_load(tmp_path):
    """A model folder with a Llama config.json and no weights at all: if --lora-targets were checked
    only after loading (as it was: ~20 s into a SmolLM2 run), this would fail on the missing weights
    instead, without naming the layers to choose from."""
    from yoda_raw.train import main

    folder = tmp_path / "llama"
    transformers.LlamaConfig(**SMALL_LLAMA, vocab_size=600).save_pretrained(folder)
    cfg = Config(
        model=str(folder),
        tokenizer="tiny",
        dataset=str(Path(__file__).parent.parent / "yoda_raw" / "tiny_yoda.jsonl"),
        quant="none",
        lora_targets=["qkv_proj"],
        output_dir=str(tmp_path / "out"),
    )
    with pytest.raises(YodaError, match=r"--lora-targets qkv_proj: no such module.* q_proj k_proj v_proj o_proj"):
        main(cfg)
    assert not (tmp_path / "out").exists()
