"""--reuse-dequant: the same loss and gradients as bitsandbytes' own 4-bit matmul, one dequantization
fewer; --fp8-matmuls: the same matmul in FP8, close to it (torch._scaled_mm runs on a CPU too, slowly)."""

import copy
import json
import os

import bitsandbytes as bnb
import pytest
import torch
import transformers
from conftest import assert_close_up_to_rounding

from yoda_raw.errors import YodaError
from yoda_raw.fast.dequant import MatmulDequantizedOnce, MatmulDequantizedOnceFP8, reuse_dequantized_weights
from yoda_raw.loss import token_loss_sum
from yoda_raw.packing import Collator


def loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_reused_dequantization_gives_bitsandbytes_loss_and_gradients(tiny_tokenizer, tiny_qlora, monkeypatch):
    """Loss and every LoRA gradient equal bitsandbytes' own path, with checkpointing on, and the
    backward dequantizes nothing: each weight is dequantized in the forward and in the recompute
    only. Catches a backward that uses the weight untransposed, loses the compute dtype, or a
    forward that is never replaced."""
    rows = [{"input_ids": list(range(5, 17)), "labels": [-100] * 3 + list(range(8, 17))} for _ in range(2)]
    batch = Collator(tiny_tokenizer.pad_token_id)(rows)
    model = tiny_qlora()
    assert model.is_gradient_checkpointing
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = torch.bfloat16  # not the model's fp32: a forward that drops it shows
    plain_loss, plain_grads = loss_and_grads(model, batch)

    layers = reuse_dequantized_weights(model)
    assert layers == sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) > 0
    calls = []
    dequantize = bnb.functional.dequantize_4bit
    monkeypatch.setattr(bnb.functional, "dequantize_4bit", lambda *a, **k: calls.append(1) or dequantize(*a, **k))
    loss, grads = loss_and_grads(model, batch)
    assert len(calls) == 2 * layers  # forward and recompute; bitsandbytes' backward would add one more each

    assert_close_up_to_rounding(loss, plain_loss, name="loss sum")
    assert grads.keys() == plain_grads.keys() and grads
    for name in grads:
        assert_close_up_to_rounding(grads[name], plain_grads[name], name=name)


def test_reuse_dequant_needs_checkpointing(tmp_path, capsys):
    """Without checkpointing every layer's dequantized weight would be kept: one line, before loading."""
    import run

    code = run.main(
        ["--preset", "tiny", "--reuse-dequant", "on", "--no-gradient-checkpointing", "--output-dir", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: --reuse-dequant on keeps each layer's dequantized weights from the recompute to the backward, so "
        "it needs gradient checkpointing; drop --no-gradient-checkpointing or use --reuse-dequant off"
    ]
    assert not any(tmp_path.iterdir())  # nothing written


def test_reuse_dequant_auto_follows_the_cuda_graph_and_on_needs_a_4bit_base(tmp_path, capsys):
    """auto is on only on the fast path (CUDA graph, 4-bit base, checkpointing); the CPU run's saved
    config says off; asking for it on an unquantized base is one line, nothing written."""
    import json

    import run
    from yoda_raw.fast.dequant import resolve

    assert resolve("auto", "on", "nf4", True) == "on"
    assert resolve("auto", "on", "nf4", False) == "off"
    assert resolve("auto", "off", "nf4", True) == "off"
    assert resolve("off", "on", "nf4", True) == "off"
    out = tmp_path / "run"
    assert (
        run.main(
            ["--preset", "tiny", "--max-steps", "1", "--eval-fraction", "0", "--no-samples", "--output-dir", str(out)]
        )
        == 0
    )
    assert json.loads((out / "run_config.json").read_text())["reuse_dequant"] == "off"
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert run.main(["--preset", "tiny", "--quant", "none", "--reuse-dequant", "on", "--output-dir", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --reuse-dequant on needs a 4-bit base (--quant nf4); use --reuse-dequant off"
    ]
    assert not bad.exists() or not any(bad.iterdir())


def test_without_gradients_the_layer_is_bitsandbytes_own(tiny_tokenizer, tiny_qlora, monkeypatch):
    """Evaluation and generation (no gradients) take bitsandbytes' forward, with its one-token
    kernel; only a forward that will have a backward goes through the shared dequantization."""
    model = tiny_qlora()
    reuse_dequantized_weights(model)
    calls = []
    forward = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or forward(self, x))
    ids = torch.tensor([list(range(5, 13))])
    with torch.no_grad():
        model(input_ids=ids)
    assert len(calls) == sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    calls.clear()
    model(input_ids=ids).logits.sum().backward()
    assert calls == []


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return ((got.float() - reference.float()).norm() / reference.float().norm()).item()


def test_fp8_matmul_gives_the_dequantized_matmuls_output_and_gradient_to_fp8s_rounding(tiny_qlora):
    """MatmulDequantizedOnceFP8 takes MatmulDequantizedOnce's arguments and gives its output and
    input gradient up to FP8's rounding (a few percent, not zero), on one of the tiny model's 4-bit
    linears. Catches a product with the weight untransposed, a gradient of the wrong shape, scales
    that do not cancel (off by the scales squared), or a cast that saturates."""
    linear = next(m for m in tiny_qlora().modules() if isinstance(m, bnb.nn.Linear4bit))
    x = torch.randn(2, 5, linear.in_features, generator=torch.Generator().manual_seed(0))
    grad_output = torch.randn(2, 5, linear.out_features, generator=torch.Generator().manual_seed(1))
    results = []
    for matmul in (MatmulDequantizedOnce, MatmulDequantizedOnceFP8):
        leaf = x.clone().requires_grad_(True)
        out = matmul.apply(leaf, linear.weight, linear.weight.quant_state)
        out.backward(grad_output)
        results.append((out.detach(), leaf.grad))
    (out, grad), (out8, grad8) = results
    assert out8.shape == out.shape == (2, 5, linear.out_features) and grad8.shape == grad.shape == x.shape
    assert out8.dtype == out.dtype and grad8.dtype == grad.dtype
    # Norm-wise: e4m3 rounds each operand by up to u = 2**-4, about u / sqrt(3) = 3.6% on average, so
    # a product of two is ~5% off (e5m2 gradients, u = 2**-3: ~8%); a transposed weight or scales that
    # do not cancel are off by 100% or more.
    assert 0 < relative_error(out8, out) < 0.1
    assert 0 < relative_error(grad8, grad) < 0.1


def test_fp8_scales_each_token_on_its_own(tiny_qlora):
    """The FP8 matmul gives each token (a row of the input, and of the output gradient) a scale of
    its own: the other tokens' outputs and input gradients are bit for bit the same whether one
    token is 10,000 x the rest or not, and within FP8's rounding of the compute-dtype matmul's.
    Catches scales taken along the wrong dimension, a row's scale applied to another row, or one
    scale for the whole tensor (an outlier would cost every other token its precision)."""
    linear = next(m for m in tiny_qlora().modules() if isinstance(m, bnb.nn.Linear4bit))
    others = [t for t in range(32) if t not in (3, 7)]

    def run(matmul, outlier: float):
        """The output and input gradient of the tokens other than 3 and 7 (scaled by `outlier`)."""
        x = torch.randn(1, 32, linear.in_features, generator=torch.Generator().manual_seed(0))
        grad_output = torch.randn(1, 32, linear.out_features, generator=torch.Generator().manual_seed(1))
        x[0, 7] *= outlier
        grad_output[0, 3] *= outlier
        leaf = x.requires_grad_(True)
        out = matmul.apply(leaf, linear.weight, linear.weight.quant_state)
        out.backward(grad_output)
        return out.detach()[0, others], leaf.grad[0, others]

    for plain, outlying in zip(run(MatmulDequantizedOnceFP8, 1.0), run(MatmulDequantizedOnceFP8, 1e4), strict=True):
        assert torch.equal(plain, outlying)
    for got, want in zip(run(MatmulDequantizedOnceFP8, 1e4), run(MatmulDequantizedOnce, 1e4), strict=True):
        assert ((got - want).norm(dim=-1) / want.norm(dim=-1)).max() < 0.1  # FP8's ~5% per token, see above


def quantized_weights(tiny_qlora) -> list:
    """(packed, quant_state) of the tiny model's 4-bit linears (double quantization, as the loop
    loads them), a weight quantized without it, and one in bf16 whose last block is short."""
    states = [(m.weight, m.weight.quant_state) for m in tiny_qlora().modules() if isinstance(m, bnb.nn.Linear4bit)]
    generator = torch.Generator().manual_seed(0)
    states.append(bnb.functional.quantize_4bit(torch.randn(96, 64, generator=generator), quant_type="nf4"))
    short_last_block = torch.randn(3, 100, generator=generator).bfloat16()  # 300 = 4 x 64 + 44
    states.append(bnb.functional.quantize_4bit(short_last_block, quant_type="nf4", compress_statistics=True))
    return states


def dequantized_fp32(packed, state) -> torch.Tensor:
    """bitsandbytes' own dequantization of a weight, from its quantization state (nested block scales
    and all), to fp32 whatever dtype it was quantized from: the reference FP8's weight cast must
    match."""
    state = copy.copy(state)
    state.dtype = torch.float32
    return bnb.functional.dequantize_4bit(packed, state)


def test_the_fp8_weight_is_bitsandbytes_dequantization_over_its_scale(tiny_qlora):
    """FP8's weight cast on a CPU (a Triton kernel does it on a GPU) gives bitsandbytes' own
    dequantization of the weight, from its quantization state, times 1 / scale, rounded to e4m3,
    bit for bit: for the tiny model's weights (double quantization), plain ones, and a bf16 one
    with a short last block. Catches nested block scales used undequantized or without their
    offset, and scales from the wrong weight."""
    from yoda_raw.fast.dequant import E4M3, weight_in_e4m3

    for packed, state in quantized_weights(tiny_qlora):
        want = dequantized_fp32(packed, state)
        w8, scale = weight_in_e4m3(packed, state)
        assert w8.dtype == E4M3 and w8.shape == want.shape
        assert torch.equal(w8.float(), (want * (1 / scale)).to(E4M3).float())


def test_the_triton_kernel_writes_bitsandbytes_dequantization_over_the_scale(tiny_qlora, tmp_path):
    """kernels.py (the GPU's NF4-to-e4m3 kernel) in Triton's interpreter, on this CPU: bit for
    bit bitsandbytes' dequantized weight x (1 / scale), before the rounding to e4m3 (written to an fp32 tensor:
    the interpreter's fp8 rounding is not the GPU's; the GPU suite checks the kernel's e4m3 itself).
    Skipped where Triton is not installed (CPU builds of torch lack it). Catches the high and low
    halves interleaved the wrong way, an off-by-one block, or the last values left unwritten."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    from yoda_raw.fast.dequant import block_scales, weight_in_e4m3

    cases = []
    for packed, state in quantized_weights(tiny_qlora):
        _, scale = weight_in_e4m3(packed, state)
        absmax, code = block_scales(state), state.code.float()
        case = {"packed": packed.data.clone(), "absmax": absmax, "code": code, "blocksize": state.blocksize}
        cases.append(case | {"inverse_scale": 1 / scale, "want": dequantized_fp32(packed, state) * (1 / scale)})
    torch.save(cases, tmp_path / "cases.pt")
    script = (
        "import sys, torch\n"
        "from yoda_raw.fast import kernels\n"
        "for c in torch.load(sys.argv[1]):\n"
        "    out = torch.full(c['want'].shape, float('nan'))\n"
        "    kernels.nf4_to_e4m3(c['packed'], c['absmax'], c['code'], c['inverse_scale'], c['blocksize'], out)\n"
        "    assert torch.equal(out, c['want']), (out, c['want'])\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cases.pt")], env=env, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-3000:]


def test_fp8_weight_scale_from_the_block_scales_is_the_dequantized_weights_own(tiny_qlora):
    """The weight's e4m3 scale comes from its 4-bit block scales, with no pass over the dequantized
    weight: for every 4-bit linear of the tiny model (double quantization, as the loop loads it), a
    weight quantized without it and with an outlier, and one in bf16, it equals the scale that
    weight's own largest magnitude gives, and the cast stays finite. Catches nested block scales used
    undequantized, the code's range left out, or a scale that lets the cast overflow (e4m3 has no
    infinity: NaN)."""
    from yoda_raw.fast.dequant import E4M3, weight_in_e4m3

    linears = [m for m in tiny_qlora().modules() if isinstance(m, bnb.nn.Linear4bit)]
    states = [(m.weight, m.weight.quant_state) for m in linears]
    assert all(state.nested for _, state in states)
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[3, 5] = 0.9  # an outlier: one block's scale far above the rest
    states.append(bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=False))
    # bf16, as the GPU loads Phi-3: the dequantized weight is rounded to bf16, its largest value too.
    states.append(bnb.functional.quantize_4bit(weight.bfloat16(), quant_type="nf4", compress_statistics=True))
    for packed, state in states:
        dequantized = bnb.functional.dequantize_4bit(packed, state).float()
        w8, scale = weight_in_e4m3(packed, state)
        # The largest weight is NF4's code 1.0 times its block's scale, exact, then one fp32 division
        # each side: within a rounding or two (u = 6e-8); 1e-6 still catches a scale from another block.
        torch.testing.assert_close(scale, dequantized.abs().max() / torch.finfo(E4M3).max, rtol=1e-6, atol=0)
        assert torch.isfinite(w8.float()).all()
        assert relative_error(w8.float() * scale, dequantized) < 0.05  # e4m3 rounding of one operand: ~3.6%


def test_fp8_matmuls_train_close_to_the_compute_dtype_run(tmp_path):
    """run.py --fp8-matmuls on: the saved config says so (and that --reuse-dequant auto went on, the
    matmul FP8 runs in), and every step's loss is within 1% of the same run's without FP8, but not
    equal to it (the FP8 products really ran); the same with every layer left out of checkpointing,
    where FP8 keeps its e4m3 weights from the forward to the backward, and without checkpointing,
    which must give those very losses (nothing to reuse: --reuse-dequant settles off). Two small
    steps: FP8 is slow on a CPU."""
    import run

    losses = {}
    runs = (
        ("on", "on", [], "on"),
        ("off", "off", [], "off"),
        ("on-uncheckpointed", "on", ["--uncheckpointed-layers", "2"], "on"),  # the tiny model has 2 decoder layers
        ("on-no-checkpointing", "on", ["--no-gradient-checkpointing"], "off"),
    )
    for name, fp8, extra, reuse in runs:
        out = tmp_path / name
        argv = ["--preset", "tiny", "--quant", "nf4", "--fp8-matmuls", fp8, "--batch-size", "2", "--max-length", "32"]
        argv += ["--no-auto-batch-size", "--max-steps", "2", "--logging-steps", "1", "--eval-fraction", "0"]
        assert run.main([*argv, *extra, "--no-samples", "--output-dir", str(out)]) == 0
        saved = json.loads((out / "run_config.json").read_text())
        assert (saved["fp8_matmuls"], saved["reuse_dequant"]) == (fp8, reuse)
        losses[name] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    for name in ("on", "on-uncheckpointed", "on-no-checkpointing"):
        assert len(losses[name]) == len(losses["off"]) == 2
        # FP8's ~5% product noise is zero-mean: over a step's 64-term sums and hundreds of tokens it moves
        # the mean loss by far less than 1%; scales that do not cancel move it by their size.
        worst = max(abs(a - b) / b for a, b in zip(losses[name], losses["off"], strict=True))
        assert 0 < worst < 0.01, losses
    assert losses["on-no-checkpointing"] == losses["on-uncheckpointed"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--quant", "none"],
            "error: --fp8-matmuls on multiplies by the dequantized 4-bit weights: it needs --quant nf4",
        ),
        (
            ["--quant", "nf4", "--reuse-dequant", "off"],
            "error: --fp8-matmuls on runs inside the matmul that --reuse-dequant puts in place; "
            "drop --reuse-dequant off",
        ),
    ],
    ids=["unquantized", "reuse-dequant-off"],
)
def test_fp8_matmuls_without_what_they_need_is_one_line_and_nothing_written(tmp_path, capsys, argv, message):
    import run

    out = tmp_path / "run"
    assert run.main(["--preset", "tiny", "--fp8-matmuls", "on", *argv, "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not out.exists() or not any(out.iterdir())


def test_fp8_matmuls_refuse_a_gpu_without_fp8_and_sizes_cublas_cannot_take(tiny_qlora, monkeypatch):
    """An Ampere GPU (compute capability 8.0) or a non-CUDA accelerator is told at once, before the
    model loads; a 4-bit linear whose sizes are not multiples of 16 (cuBLAS's FP8 matmul needs them)
    is named, rather than failing inside the first step."""
    from yoda_raw.fast.dequant import check_fp8_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(YodaError, match=r"compute capability 8.9 or later.*this is compute capability 8.0"):
        check_fp8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device(torch.device("cuda"))  # Hopper: no error
    check_fp8_device(torch.device("cpu"))  # slow, but it runs (these tests)
    with pytest.raises(YodaError, match="this is a mps device"):
        check_fp8_device(torch.device("mps"))

    model = tiny_qlora()
    linear = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    linear.in_features = 40
    with pytest.raises(YodaError, match=r"multiples of 16; 1 of \d+ are not \(the first is 40 -> "):
        reuse_dequantized_weights(model, fp8=True)


@pytest.mark.slow  # compiles every layer on a CPU, twice: a quarter of a minute on 2 cores
@pytest.mark.parametrize("fp8", ["off", "on"])
def test_compiled_layers_compile_once_for_every_layer_with_the_dequantized_matmul(tmp_path, tiny_config, fp8):
    """The GPU default (--compile-layers on with --reuse-dequant on), and with --fp8-matmuls on: every
    decoder layer shares one compiled graph; a layer that failed the first one's guards would compile
    again, and past torch's limit of 8 run eagerly (Phi-3 has 32 layers: 16 x 64 fell from 15,000 to
    11,000 tokens/s when each linear's forward was an object of its own). Any recompile during the
    run is an error here."""
    from yoda_raw.train import main

    torch._dynamo.reset()  # a compiled layer of an earlier test in this process would not match
    options = {"quant": "nf4", "compile_layers": "on", "reuse_dequant": "on", "max_steps": 1, "batch_size": 2}
    options |= {"max_length": 32, "auto_batch_size": False, "eval_fraction": 0, "samples": False, "fp8_matmuls": fp8}
    with torch._dynamo.config.patch(error_on_recompile=True):
        run = main(tiny_config(options, output_dir=str(tmp_path)))
    assert run.model.config.num_hidden_layers >= 2 and len(run.fit.log) >= 1
    torch._dynamo.reset()


def test_reuse_dequant_on_with_every_layer_uncheckpointed_is_one_line(tmp_path, capsys):
    """--reuse-dequant on works in the checkpointed layers only; with none left it would be "on" in
    the saved config and do nothing: one line instead, nothing written."""
    import run

    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--quant", "nf4", "--reuse-dequant", "on", "--uncheckpointed-layers", "2"]
    assert run.main([*argv, "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --reuse-dequant on works in the checkpointed layers, and --uncheckpointed-layers 2 leaves none; "
        "use fewer uncheckpointed layers or --reuse-dequant off"
    ]
    assert not out.exists() or not any(out.iterdir())


def test_fp8_auto_goes_on_in_the_fast_path_on_hopper_and_nowhere_else(tiny_config, monkeypatch):
    """--fp8-matmuls auto, the default, is on where it was measured to pay: compiled layers in the
    CUDA graph, bf16, a 4-bit base computed in bf16, checkpointing, a GPU of compute capability 9.x.
    Each missing piece turns it off (the eager loop and the tutorial's numerics keep bf16 products,
    an Ada or Ampere GPU is not switched to what was not measured there), and so does a model whose
    sizes cuBLAS's FP8 matmul cannot take; --reuse-dequant follows it. The settled config is the one
    printed and saved."""
    from yoda_raw.fast import compile
    from yoda_raw.settle import settle

    capability = (9, 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(compile, "has_triton", lambda: True)  # a GPU's torch has Triton
    cuda = torch.device("cuda")  # only its type is read: the model is a skeleton on the meta device
    sizes = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32064}
    phi3 = transformers.Phi3Config(hidden_size=64, intermediate_size=128, **sizes)
    fast = {"cuda_graph": "on", "compile_layers": "on", "reuse_dequant": "auto", "quant": "auto"}

    def settled(precision="bf16", model_config=phi3, **options):
        cfg, _, plan = settle(tiny_config({**fast, **options}, precision=precision), cuda, 1, model_config)
        assert (cfg.fp8_matmuls, cfg.reuse_dequant) == (plan.fp8_matmuls, plan.reuse_dequant)  # saved as run
        return plan.fp8_matmuls, plan.reuse_dequant

    assert settled() == ("on", "on")
    assert settled(cuda_graph="off", compile_layers="off") == ("off", "off")  # the eager loop
    assert settled(compile_layers="off") == ("off", "on")
    assert settled(quant_compute_dtype="float32") == ("off", "on")  # the tutorial's numerics
    assert settled(precision="fp32") == ("off", "on")
    assert settled(reuse_dequant="off") == ("off", "off")
    assert settled(gradient_checkpointing=False) == ("off", "off")
    assert settled(model_config=transformers.Phi3Config(hidden_size=72, intermediate_size=128, **sizes)) == (
        "off",
        "on",
    )
    assert settled(fp8_matmuls="off") == ("off", "on")
    capability = (8, 9)
    assert settled() == ("off", "on")  # Ada: FP8 matmuls, but not measured
    assert settled(fp8_matmuls="on") == ("on", "on")
