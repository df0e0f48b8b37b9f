"""--lora-addmm: LoRA's product added to the base product inside its matmul (yoda_raw/fast/lora.py)."""

import dataclasses

import pytest
import torch
from conftest import assert_close_up_to_rounding

from tests.common import batch_of, lora_layers, with_trained_lora
from yoda_raw import fast
from yoda_raw.fast.lora import addmm_forward, use_addmm
from yoda_raw.loss import token_loss_sum


def step(model, batch) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks for both forms (neither draws anything else)
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_addmm_gives_pefts_loss_and_gradients(tiny_tokenizer, tiny_qlora):
    """The tiny 4-bit model with dropout (p = 0.2) and trained LoRA B: the loss and every LoRA
    gradient as peft's own forward gives them, up to fp32 rounding (the product and the add are
    summed in another order). Catches the scale lost or applied twice, the dropout skipped, the
    base product dropped, or B used untransposed (its gradients would differ by far more)."""
    batch = batch_of(tiny_tokenizer)
    model = with_trained_lora(tiny_qlora(lora_dropout=0.2))
    loss, grads = step(model, batch)
    assert use_addmm(model) == len(lora_layers(model)) > 0
    addmm_loss, addmm_grads = step(model, batch)
    # Sums in another order: equal up to fp32 rounding of the tiny model's step (conftest).
    assert_close_up_to_rounding(addmm_loss, loss, name="loss sum")
    assert addmm_grads.keys() == grads.keys() and grads
    for name in grads:
        assert_close_up_to_rounding(addmm_grads[name], grads[name], name=name)


def test_addmm_under_bf16_autocast_gives_pefts_dtype_and_values(tiny_tokenizer, tiny_qlora):
    """Under bf16 autocast (what a GPU run uses), each LoRA linear gives peft's dtype, and values
    within bf16's rounding of peft's: addmm rounds the sum once, peft rounds B's product and then the
    sum. Catches a dtype error between the bf16 base product and fp32 LoRA weights."""
    model = with_trained_lora(tiny_qlora())
    layer = lora_layers(model)[0]
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        peft_out = layer(x)
        addmm_out = addmm_forward(layer, x)
    assert addmm_out.dtype == peft_out.dtype and addmm_out.shape == peft_out.shape
    # Two bf16 roundings against one, each at most 2**-8 of a value's size: 1% of the output's norm
    # is far above them and far below a lost LoRA product (B ~ N(0, 0.1), scale 2).
    assert (addmm_out.float() - peft_out.float()).norm() <= 1e-2 * peft_out.float().norm()


def test_adapters_disabled_or_merged_run_as_peft_does(tiny_qlora):
    """With the adapter disabled (peft's disable_adapter, as used to compare with the base model)
    the patched layer gives the base product alone, as peft's does. Catches LoRA added regardless."""
    model = with_trained_lora(tiny_qlora())
    layer = lora_layers(model)[0]
    x = torch.randn(1, 3, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_lora = addmm_forward(layer, x)
        with model.disable_adapter():
            assert torch.equal(addmm_forward(layer, x), layer.base_layer(x))
    assert not torch.allclose(with_lora, layer.base_layer(x))


def test_the_fast_path_puts_it_in_where_it_pays_or_is_asked(tiny_qlora, tiny_config):
    """auto is on in compiled split halves (where it saves memory at the same speed) and off in
    whole layers (where it costs speed), compiled or not; on and off are kept as given; on replaces
    every LoRA linear's forward, and the run's line of levers names it."""
    cfg = tiny_config(quant="nf4")
    assert cfg.lora_addmm == "auto"
    skeleton = tiny_qlora()

    def settled(**options) -> fast.Plan:
        plan = fast.settle(dataclasses.replace(cfg, **options), torch.device("cpu"), 1, "fp32", "nf4", skeleton)
        assert ("lora-addmm" in str(plan)) == (plan.lora_addmm == "on")
        return plan

    def addmm(**options) -> str:
        return settled(**options).lora_addmm

    assert addmm() == addmm(compile_layers="on") == addmm(split_layers="on") == "off"
    assert addmm(split_layers="on", compile_layers="on") == "on"
    assert addmm(split_layers="on", compile_layers="on", lora_addmm="off") == "off"
    plan = settled(lora_addmm="on")
    assert plan.lora_addmm == "on"
    model = tiny_qlora()
    fast.apply(plan, model)
    assert all(m.forward.__func__ is addmm_forward for m in lora_layers(model))


@pytest.mark.slow  # compiles the tiny model's layers with inductor: about ten seconds on 2 cores
def test_compiled_layers_take_it_whole(tiny_tokenizer, tiny_qlora):
    """The GPU runs it inside compiled layers: there it must compile without a graph break (a break
    would run LoRA eagerly between compiled pieces, slower than without it) and give the eager
    loss and gradients up to rounding."""
    from yoda_raw.fast.compile import compile_layers

    batch = batch_of(tiny_tokenizer)
    model = with_trained_lora(tiny_qlora(lora_dropout=0.0))
    use_addmm(model)
    loss, grads = step(model, batch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        compile_layers(model)
        compiled_loss, compiled_grads = step(model, batch)
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    finally:
        torch._dynamo.reset()
    # Inductor sums in other orders: equal up to fp32 rounding of the tiny model's step (conftest).
    assert_close_up_to_rounding(compiled_loss, loss, name="loss sum")
    for name in grads:
        assert_close_up_to_rounding(compiled_grads[name], grads[name], name=name)


def test_lora_on_other_layers_keeps_pefts_forward():
    """LoRA can sit on embeddings and convolutions too (peft's target_modules); addmm is a linear's
    product, so only the linear is patched and the embedding's LoRA still gives peft's output.
    Catches the patch applied to every LoRA layer (an embedding's input is token ids: addmm's
    forward would fail or compute nonsense)."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lin = torch.nn.Embedding(11, 6), torch.nn.Linear(6, 4)

        def forward(self, ids):
            return self.lin(self.emb(ids))

    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["emb", "lin"], init_lora_weights=False))
    ids = torch.tensor([[1, 5, 7]])
    with torch.no_grad():
        before = model(ids)
        assert use_addmm(model) == 1
        after = model(ids)
    emb, lin = model.base_model.model.emb, model.base_model.model.lin
    assert "forward" not in vars(emb) and vars(lin)["forward"].__func__ is addmm_forward
    # The linear's LoRA add in another order: equal up to fp32 rounding (conftest).
    assert_close_up_to_rounding(after, before, name="output")
