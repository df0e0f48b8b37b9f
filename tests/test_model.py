"""The model stage: parameter counts on the real architecture, freezing, LoRA placement."""

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
