"""The GPU path under test: what CI's CPU never runs. `pytest -m gpu` on a machine with a CUDA GPU.

bitsandbytes' CUDA kernels, the paged 8-bit optimizer in unified memory, bf16 autocast and fp16 loss
scaling on CUDA, generation on a GPU, and the fast path (`--cuda-graph`) are exercised here:
- per-step losses of run.py against TRL's SFTTrainer on the full-size Phi-3-mini architecture
  (random weights: no download), with the tutorial's numerics and with our defaults;
- the fast path against the eager loop, step by step, and its dropout masks; FP8 matmuls against bf16;
  the memory levers (offloading, the split layers in chunks) against the defaults;
- the paged optimizer really paged, and its update equal to bitsandbytes' own;
- bf16 and fp16 both train; resume equals a straight run; the steps between log lines never wait
  for the GPU; --auto-batch-size settles under a cap;
- batched greedy generation from a 4-bit adapter equals one sentence at a time.
Every test is skipped, saying why, where there is no CUDA GPU. The tolerances are those the GPU's
formats allow, each justified where it is set. With YODA_RAW_GPU_REPORT=FILE the measured figures
(worst differences, losses) are written to FILE as JSON, for the record in benchmarks/results/.
"""

import dataclasses
import gc
import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from accelerate.state import AcceleratorState

from yoda_raw import optim
from yoda_raw.config import PRESETS, Config
from yoda_raw.fast.flat import FlatAdamW, flat_optimizer
from yoda_raw.model import random_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run `pytest -m gpu` on a GPU machine"),
]

STEPS = 20  # per-step loss comparisons: 20 optimizer steps of 16 x 64 tokens


@pytest.fixture(scope="session")
def report():
    """Figures measured by the tests; written as JSON at the end when YODA_RAW_GPU_REPORT is set."""
    figures = {}
    yield figures
    if os.environ.get("YODA_RAW_GPU_REPORT"):
        Path(os.environ["YODA_RAW_GPU_REPORT"]).write_text(json.dumps(figures, indent=2))


@pytest.fixture(scope="session")
def phi3_checkpoint(tmp_path_factory, phi3_path):
    """The full-size Phi-3-mini-4k architecture with random weights (bf16), saved once for all tests:
    every pipeline then loads and quantizes the same weights through from_pretrained.
    YODA_RAW_PHI3_CHECKPOINT names one already written (benchmarks/common.save_random_checkpoint)."""
    if os.environ.get("YODA_RAW_PHI3_CHECKPOINT"):
        return Path(os.environ["YODA_RAW_PHI3_CHECKPOINT"])
    folder = tmp_path_factory.mktemp("phi3-random")
    config = transformers.AutoConfig.from_pretrained(phi3_path)
    model = random_model(config, seed=42, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(output_dir) -> list[float]:
    return [record["loss"] for record in metrics(output_dir) if "loss" in record and "step" in record]


def worst_relative(ours: list[float], reference: list[float]) -> float:
    assert len(ours) == len(reference) >= 2, (ours, reference)
    return max(abs(a - b) / abs(b) for a, b in zip(ours, reference, strict=True))


def run_py(argv: list[str]) -> int:
    """run.py's main, in this process (it is a script at the repository root, not in the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run", Path(__file__).resolve().parent.parent / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    AcceleratorState._reset_state(True)
    try:
        return module.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        torch.cuda.empty_cache()


# --- 1. run.py against SFTTrainer, and the fast path against the eager loop -------------------------------


def phi3_argv(checkpoint, phi3_path, yoda_rows_path, output_dir, *extra: str) -> list[str]:
    """The tutorial's configuration on the random Phi-3, made comparable step by step: every token
    supervised (as SFTTrainer trains the tutorial's data), rows in order, no LoRA dropout."""
    return [
        *("--model", str(checkpoint), "--tokenizer", str(phi3_path), "--dataset", str(yoda_rows_path)),
        *("--train-on", "all", "--no-shuffle", "--lora-dropout", "0", "--eval-fraction", "0"),
        *("--max-steps", str(STEPS), "--logging-steps", "1", "--no-samples", "--no-auto-batch-size"),
        *("--output-dir", str(output_dir), *extra),
    ]


@pytest.fixture(scope="module")
def phi3_runs(tmp_path_factory, phi3_checkpoint, phi3_path, yoda_rows_path):
    """Per-step losses of each pipeline on the random Phi-3, each computed once for the module."""
    variants = {
        "tutorial-numerics": ["--fp32-frozen", "--quant-compute-dtype", "float32"],
        "eager": ["--cuda-graph", "off"],
        "defaults": [],  # on one GPU in bf16: --cuda-graph auto is on (and --fp8-matmuls auto on Hopper)
        "graph-bf16": ["--fp8-matmuls", "off"],
        "fp8": ["--fp8-matmuls", "on"],
        "offload": ["--offload-activations", "on"],
        # 16 x 64 is 1,024 tokens a micro-batch: the MLP half in two chunks.
        "split": ["--offload-activations", "on", "--split-layers", "on", "--mlp-chunk", "512"],
    }

    def losses(name: str) -> list[float]:
        if name not in cache:
            out = tmp_path_factory.mktemp(name)
            if name == "sft":
                cache[name] = sfttrainer_losses(phi3_checkpoint, phi3_path, yoda_rows_path, out)
            else:
                assert run_py(phi3_argv(phi3_checkpoint, phi3_path, yoda_rows_path, out, *variants[name])) == 0
                cache[name] = step_losses(out)
                settled[name] = json.loads((out / "run_config.json").read_text())
                peaks[name] = max(record.get("peak_allocated_gib", 0) for record in metrics(out))
        return cache[name]

    cache, settled, peaks = {}, {}, {}
    losses.settled = settled  # each run's saved config, as it settled its auto options
    losses.peaks = peaks  # each run's peak allocated GiB, the loop's (meter.reset_peaks)
    return losses


def sfttrainer_losses(checkpoint, phi3_path, yoda_rows_path, output_dir) -> list[float]:
    """The tutorial's SFTTrainer set-up (4-bit NF4 with fp32 compute, prepare_model_for_kbit_training,
    LoRA r=8 on the four modules, bf16, checkpointing, paged 8-bit AdamW), rows in order, no dropout."""
    import datasets
    import trl
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    tokenizer = transformers.AutoTokenizer.from_pretrained(phi3_path)
    tokenizer.pad_token = tokenizer.unk_token
    rows = [json.loads(line) for line in Path(yoda_rows_path).read_text().splitlines() if line.strip()]
    messages = [
        [{"role": "user", "content": r["sentence"]}, {"role": "assistant", "content": r["translation_extra"]}]
        for r in rows
    ]
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=quant, device_map={"": 0})
    model = prepare_model_for_kbit_training(model)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=["o_proj", "qkv_proj", "gate_up_proj", "down_proj"],
    )
    transformers.set_seed(42)  # as our add_lora seeds right before get_peft_model: the same LoRA A
    model = get_peft_model(model, lora)
    args = trl.SFTConfig(
        output_dir=str(output_dir),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        per_device_train_batch_size=16,
        max_length=64,
        packing=True,
        packing_strategy="wrapped",
        learning_rate=3e-4,
        optim="paged_adamw_8bit",
        bf16=True,
        max_steps=STEPS,
        num_train_epochs=10,  # the schedule decays over max_steps, as ours does with --max-steps
        logging_steps=1,
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=42,
    )
    try:
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            processing_class=tokenizer,
            train_dataset=datasets.Dataset.from_dict({"messages": messages}),
        )
        trainer.train()
    finally:
        AcceleratorState._reset_state(True)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    del trainer, model
    torch.cuda.empty_cache()
    return losses


def test_tutorial_numerics_match_sfttrainer_within_half_a_percent(phi3_runs, report):
    """With the tutorial's numerics (fp32 frozen weights and 4-bit compute), every one of 20 steps'
    losses is within 0.5% of SFTTrainer's. What still differs: TRL casts the LoRA weights to bf16,
    we keep them fp32; bf16 autocast rounds each product to 8 mantissa bits (0.4%) either way.
    Catches a wrong loss normalisation, schedule, clipping, optimizer setting or data order."""
    worst = worst_relative(phi3_runs("tutorial-numerics"), phi3_runs("sft"))
    report["sft_vs_tutorial_numerics_worst_rel"] = worst
    report["sft_losses"] = phi3_runs("sft")
    assert worst <= 0.005, (phi3_runs("tutorial-numerics"), phi3_runs("sft"))


def test_defaults_match_sfttrainer_within_one_percent(phi3_runs, report):
    """Our defaults (frozen norms, embeddings and head in bf16; 4-bit compute in bf16; the CUDA graph;
    on Hopper FP8 matmuls) change the numerics a little, not the learning: within 1% of SFTTrainer at
    every step. --fp8-matmuls auto settles on on Hopper, off on other GPUs (where it was not measured)."""
    worst = worst_relative(phi3_runs("defaults"), phi3_runs("sft"))
    report["sft_vs_defaults_worst_rel"] = worst
    report["defaults_losses"] = phi3_runs("defaults")
    report["defaults_fp8_matmuls"] = phi3_runs.settled["defaults"]["fp8_matmuls"]
    assert worst <= 0.01, (phi3_runs("defaults"), phi3_runs("sft"))
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert phi3_runs.settled["defaults"]["fp8_matmuls"] == ("on" if hopper else "off")


def test_cuda_graph_matches_the_eager_loop(phi3_runs, report):
    """The default on a GPU, --cuda-graph (auto: on), here with bf16 products (--fp8-matmuls off),
    replays a recording of the same forward and backward: per-step losses within 1% of the eager
    loop over 20 steps (the bar every fast path passes before it may become a default; the kernels
    are the same, so the difference is rounding order at most)."""
    worst = worst_relative(phi3_runs("graph-bf16"), phi3_runs("eager"))
    report["cuda_graph_vs_eager_worst_rel"] = worst
    report["eager_losses"] = phi3_runs("eager")
    assert worst <= 0.01, (phi3_runs("graph-bf16"), phi3_runs("eager"))


def test_offloaded_activations_learn_as_the_defaults_in_less_memory(phi3_runs, report):
    """--offload-activations on, in the CUDA graph as the defaults run: each layer's input goes to
    host memory and comes back for its backward, bit for bit. Per-step losses within 1% of the
    defaults' over 20 steps (the bar every lever passes; the kernels are the same, so only their
    order of atomic adds may differ), and the loop's peak allocated lower by at least half of the 32
    layer inputs (16 x 64 x 3,072 bf16, 6 MiB each; the GPU holds two or three at a time). Catches
    a copy replayed from the wrong buffer (the losses part), or inputs kept on the GPU anyway."""
    worst = worst_relative(phi3_runs("offload"), phi3_runs("defaults"))
    saved_gib = phi3_runs.peaks["defaults"] - phi3_runs.peaks["offload"]
    report["offload_vs_defaults_worst_rel"] = worst
    report["offload_peak_allocated_saved_gib"] = saved_gib
    report["offload_losses"] = phi3_runs("offload")
    assert worst <= 0.01, (phi3_runs("offload"), phi3_runs("defaults"))
    assert phi3_runs.settled["offload"]["cuda_graph"] == "on"
    layer_input_gib = 16 * 64 * 3072 * 2 / 2**30  # (B, T, H) in bf16
    assert saved_gib >= 32 / 2 * layer_input_gib, phi3_runs.peaks


def test_split_layers_in_chunks_learn_as_the_defaults(phi3_runs, report):
    """--split-layers on --mlp-chunk 512 with offloading, in the CUDA graph with compiled halves as
    the defaults run: per-step losses within 1% of the defaults' over 20 steps (the bar every lever
    passes; the same arithmetic, the MLP's sums over fewer rows at a time). Catches a half or a
    chunk replayed from the wrong buffer, or a residual lost in the compiled halves."""
    worst = worst_relative(phi3_runs("split"), phi3_runs("defaults"))
    report["split_vs_defaults_worst_rel"] = worst
    report["split_losses"] = phi3_runs("split")
    assert worst <= 0.01, (phi3_runs("split"), phi3_runs("defaults"))
    assert phi3_runs.settled["split"]["cuda_graph"] == phi3_runs.settled["split"]["compile_layers"] == "on"


def test_fp8_matmuls_learn_as_the_bf16_run(phi3_runs, report):
    """--fp8-matmuls on (the frozen products in FP8, in the CUDA graph as every default is) changes
    each product by a few percent, not the learning: per-step losses within 1% of the same run's
    with bf16 products (--fp8-matmuls off) over 20 steps, and not equal to them (the FP8 matmul
    really ran)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9 or later")
    worst = worst_relative(phi3_runs("fp8"), phi3_runs("graph-bf16"))
    report["fp8_vs_graph_bf16_worst_rel"] = worst
    report["fp8_losses"] = phi3_runs("fp8")
    assert 0 < worst <= 0.01, (phi3_runs("fp8"), phi3_runs("graph-bf16"))


def test_the_nf4_to_e4m3_kernel_matches_the_torch_ops_on_the_gpu():
    """--fp8-matmuls on's weight cast on CUDA (kernels.py's Triton kernel, through the
    yoda_raw::nf4_to_e4m3 op) gives bit for bit what bitsandbytes' own dequantization to fp32 and
    torch's e4m3 cast give, for Phi-3-mini's qkv shape quantized by bitsandbytes on the GPU (double
    quantization, bf16), and those values are bitsandbytes' dequantization to bf16's rounding.
    Catches a kernel whose rounding to e4m3 is not torch's, or that reads bitsandbytes' CUDA layout
    otherwise than its CPU one."""
    import copy

    import bitsandbytes as bnb

    from yoda_raw.fast.dequant import E4M3, weight_in_e4m3

    weight = (torch.randn(9216, 3072, device="cuda") * 0.02).bfloat16()
    packed, state = bnb.functional.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    w8, scale = weight_in_e4m3(packed, state)
    state_fp32 = copy.copy(state)
    state_fp32.dtype = torch.float32
    reference = bnb.functional.dequantize_4bit(packed, state_fp32)
    assert torch.equal(w8.view(torch.uint8), (reference * (1 / scale)).to(E4M3).view(torch.uint8))
    assert torch.equal(reference.bfloat16(), bnb.functional.dequantize_4bit(packed, state))


def test_the_seeded_dropout_kernel_on_the_gpu():
    """--seeded-dropout on's mask on CUDA (kernels.py's Triton kernel, through the
    yoda_raw::dropout_mask op): about 1 - p kept over Phi-3's down_proj input at 16 x 512, the same
    mask for the same seed, another for another, and SeededDropout's gradient is its mask over
    1 - p. Catches a kernel whose threshold or seed handling differs on the GPU from the
    interpreter's run on a CPU."""
    from yoda_raw.fast.dropout import SeededDropout, dropout_mask

    seed = torch.tensor(2024, device="cuda")
    mask = dropout_mask(seed, 16 * 512 * 8192, 0.05)
    # 67M draws: the kept share's standard deviation is sqrt(0.95 * 0.05 / 6.7e7) = 2.7e-5; +-5e-4 is 19 of them.
    assert 0.9495 < mask.float().mean().item() < 0.9505
    assert torch.equal(mask, dropout_mask(seed, 16 * 512 * 8192, 0.05))
    assert not torch.equal(mask, dropout_mask(seed + 1, 16 * 512 * 8192, 0.05))
    x = torch.ones(4096, 1024, device="cuda", requires_grad=True)
    y = SeededDropout(0.05)(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.95)  # one fp32 division each side: the fp32 default


@pytest.mark.parametrize("seeded", [False, True], ids=["torch-dropout", "seeded-dropout"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_checkpoint_recompute_draws_the_forward_dropout_mask_inside_a_graph(compiled, seeded):
    """Gradient checkpointing recomputes each layer in backward, dropout included; the recompute
    must draw the forward's mask, also when both are replayed from a CUDA graph (where the random
    state advances per replay), and also when the layer is compiled (--compile-layers: the compiled
    dropout draws its own random numbers). With x = 1 and w = 1, the loss counts the forward's kept
    elements and d loss / d w counts the recompute's: they must agree, at every replay, and change
    between replays. The same for --seeded-dropout (the fast path's default), whose seed must be
    drawn anew at each replay, not recorded once."""
    from torch.utils.checkpoint import checkpoint

    from yoda_raw.fast.dropout import SeededDropout

    x = torch.ones(4096, device="cuda")
    w = torch.ones((), device="cuda", requires_grad=True)
    w.grad = torch.zeros_like(w)

    def block(x):
        if seeded:
            return SeededDropout(0.5)(x) * w
        return torch.nn.functional.dropout(x, p=0.5, training=True) * w

    if compiled:
        block = torch.compile(block, dynamic=False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        checkpoint(block, x, use_reentrant=False).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.grad.zero_()
        loss = checkpoint(block, x, use_reentrant=False).sum()
        loss.backward()
    seen = set()
    for _ in range(3):
        graph.replay()
        assert torch.equal(loss, w.grad), (loss.item(), w.grad.item())
        seen.add(loss.item())
    assert len(seen) > 1  # each replay draws a new mask


# --- 2. the paged 8-bit optimizer ----------------------------------------------------------------------


def test_paged_adamw_8bit_is_paged_and_equals_bitsandbytes_own():
    """Our paged_adamw_8bit keeps 8-bit state, in unified memory (paged) for tensors of 100,000+
    elements, 32-bit state below 4,096 elements, and updates exactly as bitsandbytes' own
    PagedAdamW8bit with the Trainer's hyper-parameters (weight decay 0) on the same gradients."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    shapes = [(16384, 8), (8, 3072), (64,)]  # gate_up_proj.lora_B, a lora_A, a small tensor
    ours = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = optim.build_optimizer(ours, "paged_adamw_8bit", 3e-4, 0.0, torch.device("cuda"))
    opt_theirs = bnb.optim.PagedAdamW8bit(theirs, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    torch.cuda.synchronize()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
    big, lora_a, small = (opt_ours.state[p] for p in ours)
    assert getattr(big["state1"], "is_paged", False) and big["state1"].dtype == torch.uint8
    assert not getattr(lora_a["state1"], "is_paged", False) and lora_a["state1"].dtype == torch.uint8
    assert small["state1"].dtype == torch.float32


def test_flat_paged_adamw_8bit_equals_bitsandbytes_own_and_resumes_from_its_state():
    """The CUDA graph's optimizer (FlatAdamW: Phi-3-mini's LoRA shapes as one flat tensor,
    its state paged) updates exactly as bitsandbytes' PagedAdamW8bit over the separate tensors, with
    the gradients added by autograd into the flat gradient's views; and a checkpoint of either loads
    into the other and takes the same next step."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    shapes = [(16384, 8), (8, 3072), (9216, 8), (8, 8192), (3072, 8)]  # gate_up B, an A, qkv B, down A, o B
    ours = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = flat_optimizer(optim.build_optimizer(ours, "paged_adamw_8bit", 3e-4, 0.0, torch.device("cuda")))
    opt_theirs = bnb.optim.PagedAdamW8bit(theirs, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert isinstance(opt_ours, FlatAdamW)

    def step(params, optimizer, seed):
        generator = torch.Generator(device="cuda").manual_seed(seed)
        sum((p * torch.randn(p.shape, device="cuda", generator=generator)).sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not isinstance(optimizer, FlatAdamW))

    for seed in range(3):
        step(ours, opt_ours, seed)
        step(theirs, opt_theirs, seed)
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs, strict=True))
    assert getattr(opt_ours.state[opt_ours.flat]["state1"], "is_paged", False)

    ours_saved, theirs_saved = opt_ours.state_dict(), opt_theirs.state_dict()
    crossed_theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_crossed_theirs = bnb.optim.PagedAdamW8bit(
        crossed_theirs, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
    )
    opt_crossed_theirs.load_state_dict(ours_saved)
    crossed_ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    opt_crossed_ours = flat_optimizer(
        optim.build_optimizer(crossed_ours, "paged_adamw_8bit", 3e-4, 0.0, torch.device("cuda"))
    )
    opt_crossed_ours.load_state_dict(theirs_saved)
    for params, optimizer in ((ours, opt_ours), (crossed_theirs, opt_crossed_theirs), (crossed_ours, opt_crossed_ours)):
        step(params, optimizer, 3)
    torch.cuda.synchronize()
    for p, q, r in zip(ours, crossed_theirs, crossed_ours, strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)


# --- 3. bf16 and fp16 train; resume; auto batch size ------------------------------------------------------


def train(cfg: Config):
    from yoda_raw.train import main

    AcceleratorState._reset_state(True)
    try:
        return main(cfg)
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bf16_and_fp16_train(tmp_path, precision, report, tiny_config):
    """30 steps on the tiny preset: the loss falls by a quarter in either format (bf16 measured:
    6.23 -> 4.24 over the first and last 5 steps). fp16 runs with Accelerate's loss scaler; the steps
    it skipped on overflow are counted in every record."""
    options = {"precision": precision, "max_steps": 30, "logging_steps": 1, "eval_fraction": 0.0}
    train(tiny_config(output_dir=str(tmp_path), samples=False, **options))
    records = metrics(tmp_path)
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    report[f"{precision}_loss_first5_last5"] = [first, last]
    assert last < first * 3 / 4, losses
    skipped = records[-1]["skipped_steps"]
    report[f"{precision}_skipped_steps"] = skipped
    assert skipped < 30 if precision == "fp16" else skipped == 0


@pytest.mark.parametrize("cuda_graph", ["on", "off"])
def test_the_memory_breakdown_adds_up_with_cublas_workspaces(tmp_path, report, tiny_config, cuda_graph):
    """The breakdown's counted parts, cuBLAS's workspaces among them, add up to torch's allocated
    memory after the loop, on the fast path and on the eager one; the workspaces are at least one,
    and a whole number of them. Catches workspaces not found (the check then misses by one or more
    32 MiB workspaces on Hopper) or a part counted twice."""
    from yoda_raw import meter
    from yoda_raw.train import main

    memory = meter.MemoryReport(show=False)
    options = {"precision": "bf16", "max_steps": 3, "logging_steps": 1, "eval_fraction": 0.0, "samples": False}
    AcceleratorState._reset_state(True)
    try:
        main(tiny_config(options, cuda_graph=cuda_graph, output_dir=str(tmp_path)), observer=memory)
    finally:
        AcceleratorState._reset_state(True)
    b = memory.breakdown
    report[f"breakdown_{cuda_graph}"] = b
    size = meter.cublas_workspace_size(torch.device("cuda")) / 2**30
    count = b["cublas_workspaces_gib"] / size  # the breakdown rounds GiB to 4 decimals
    assert count >= 0.99 and abs(count - round(count)) < 0.01, (count, b)
    assert b["adds_up"], b


def test_resume_on_the_gpu_gives_the_straight_runs_losses(tmp_path, report, tiny_config):
    """Stopped at step 4 and resumed, the run logs the straight run's losses at steps 5-12. bf16
    rounding is deterministic for the same kernels on the same shapes; what can differ is the order
    of atomic additions in some backward kernels, a rounding-level effect: 1e-3 relative allows
    that, while a wrong data position, learning rate or optimizer state moves a loss by percents."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # LoRA dropout on: the resumed run must draw the straight run's masks (the CUDA graph is on, auto).
    common = {"precision": "bf16", "max_steps": 12, "save_steps": 4, "logging_steps": 1, "eval_fraction": 0.0}
    common |= {"lora_dropout": 0.05, "samples": False}
    train(tiny_config(common, output_dir=str(straight)))
    train(tiny_config(common, output_dir=str(resumed), resume=str(straight / "checkpoint-4")))
    worst = worst_relative(step_losses(resumed)[-8:], step_losses(straight)[-8:])
    report["resume_worst_rel"] = worst
    assert worst <= 1e-3, (step_losses(resumed), step_losses(straight))


def test_steps_between_log_lines_never_wait_for_the_gpu(tmp_path, tiny_config):
    """Between log lines the host never waits for the GPU, so it queues the next step while the GPU
    runs this one: steps 2 to 7 of 8 run under torch's sync debug mode "error", which raises on any
    synchronizing call (a batch copied from unpinned memory or without non_blocking, an .item(), a
    host-side NaN check). Step 1 warms up the CUDA graph and logs, step 8 logs, outside it: the mode
    goes on once step 1's line is written (the loop's logged hook) and off after step 7's update.
    Catches the copies waiting again or a sync added to the step."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from yoda_raw.hooks import Observer
    from yoda_raw.train import main

    class StrictAfterStep1(Observer):
        def logged(self, record: dict) -> None:
            if record["step"] == 1:
                torch.cuda.set_sync_debug_mode("error")

    done = []

    def lenient_after_step_7(optimizer, args, kwargs):  # after each optimizer step
        done.append(len(done) + 1)
        if done[-1] == 7:
            torch.cuda.set_sync_debug_mode("default")

    hook = register_optimizer_step_post_hook(lenient_after_step_7)
    AcceleratorState._reset_state(True)
    try:
        options = {"precision": "bf16", "max_steps": 8, "logging_steps": 8, "eval_fraction": 0.0, "samples": False}
        run = main(tiny_config(options, output_dir=str(tmp_path)), observer=StrictAfterStep1())
    finally:
        hook.remove()
        torch.cuda.set_sync_debug_mode("default")
        AcceleratorState._reset_state(True)
    assert run.config.cuda_graph == "on" and done == list(range(1, 9))
    assert [record["step"] for record in run.fit.log] == [1, 8]


@pytest.mark.parametrize("graph, offload", [("off", "off"), ("on", "off"), ("on", "on")])
def test_auto_batch_size_settles_under_a_memory_cap(
    tmp_path, graph, offload, phi3_checkpoint, phi3_path, yoda_rows_path, report, monkeypatch
):
    """Under a 6 GiB cap, 40 rows of 512 tokens do not fit Phi-3-mini: --auto-batch-size retries with
    0.9x the rows until a batch trains, and records the batch it settled on in every metrics line;
    with the CUDA graph too (an out-of-memory error inside the capture must leave nothing behind),
    and with offloading's copies on their own stream (which must not keep the capture from ending).
    The report says which attempts ran out of memory inside the capture, where it is hardest to
    leave nothing behind (an attempt may instead run out in its eager first step)."""
    from yoda_raw.fast.graphs import GraphStep

    captures_out_of_memory = []  # the rows of each attempt whose capture ran out of memory
    capture = GraphStep._capture_or_clean_up

    def recorded(self):
        try:
            capture(self)
        except torch.OutOfMemoryError:
            captures_out_of_memory.append(self.batch["input_ids"].shape[0])
            raise

    monkeypatch.setattr(GraphStep, "_capture_or_clean_up", recorded)
    gc.collect()
    torch.cuda.empty_cache()
    # What earlier tests' runs left allocated counts against the cap too (see the next test).
    report[f"auto_batch_size_allocated_at_start_gib_graph_{graph}_offload_{offload}"] = round(
        torch.cuda.memory_allocated() / 2**30, 3
    )
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(6 * 1024**3 / total)
    try:
        argv = [
            *("--model", str(phi3_checkpoint), "--tokenizer", str(phi3_path), "--dataset", str(yoda_rows_path)),
            *("--batch-size", "40", "--max-length", "512", "--max-steps", "2", "--logging-steps", "1"),
            *("--cuda-graph", graph, "--offload-activations", offload),
            *("--eval-fraction", "0", "--no-samples", "--output-dir", str(tmp_path)),
        ]
        assert run_py(argv) == 0
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    settled = {r["batch_size"] for r in metrics(tmp_path)}
    report[f"auto_batch_size_settled_graph_{graph}_offload_{offload}"] = sorted(settled)
    report[f"auto_batch_size_capture_out_of_memory_graph_{graph}_offload_{offload}"] = captures_out_of_memory
    assert len(settled) == 1 and 1 <= settled.pop() < 40


def test_a_finished_run_leaves_nothing_allocated(tmp_path, phi3_checkpoint, phi3_path, yoda_rows_path, report):
    """Runs one after another in one process (a notebook, --auto-batch-size's retries, this file's
    tests) each start from what the last left: once a run has returned and been collected, none of
    its tensors may stay on the GPU (its weights, the CUDA graph's pool, the FP8 weights, the flat
    optimizer's buffers). What one leaves, the next cannot use: under a cap, --auto-batch-size after
    an earlier run would settle on fewer rows than alone (benchmarks/NOTES.md, item 89). Two runs:
    the second may leave nothing more than the first, and the first no more than a library's buffer
    made once for the process."""

    def allocated() -> int:
        gc.collect()
        torch.cuda.empty_cache()
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            clear_workspaces()  # cuBLAS keeps a workspace for each stream it ran on, for the process
        return torch.cuda.memory_allocated()

    def reachable() -> str:  # what still holds memory, for the failure's message
        tensors = [t for t in gc.get_objects() if torch.is_tensor(t) and t.device.type == "cuda"]
        tensors.sort(key=lambda t: -t.untyped_storage().nbytes())
        return ", ".join(
            f"{t.untyped_storage().nbytes() / 2**20:.1f} MiB {t.dtype} {tuple(t.shape)}" for t in tensors[:8]
        )

    argv = phi3_argv(phi3_checkpoint, phi3_path, yoda_rows_path, tmp_path, "--offload-activations", "on")
    left = [allocated()]
    for _ in range(2):  # the graph, compiled layers, FP8, offloading and the flat paged optimizer
        assert run_py([*argv, "--max-steps", "3", "--overwrite"]) == 0
        left.append(allocated())
    first_mib, second_mib = (left[1] - left[0]) / 2**20, (left[2] - left[1]) / 2**20
    report["run_left_allocated_mib"] = [round(first_mib, 1), round(second_mib, 1)]
    # 8 MiB: less than the smallest weight a layer holds in FP8 (o_proj, 3,072 x 3,072: 9 MiB), and
    # far less than the CUDA graph's pool. 0.1 GiB: the memory breakdown's own tolerance.
    assert second_mib < 8, f"a second run left {second_mib:.1f} MiB more allocated; reachable: {reachable()}"
    assert first_mib < 0.1 * 1024, f"a run left {first_mib:.1f} MiB allocated; reachable: {reachable()}"


# --- 4. generation ------------------------------------------------------------------------------------------


def test_batched_generation_from_a_4bit_adapter_equals_one_by_one(tmp_path, report, tiny_config):
    """A tiny 4-bit model memorises 8 pairs on the GPU; loaded back from its adapter folder, greedy
    generation of a left-padded batch gives the same tokens as one sentence at a time, and gives
    most pairs back. Catches right padding or a lost attention mask on the GPU's kernels."""
    from yoda_raw.generate import generate_ids, load_for_inference, prompt_ids

    rows = [json.loads(line) for line in Path(PRESETS["tiny"]["dataset"]).read_text().splitlines()[:8]]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"dataset": str(pairs), "eval_fraction": 0.0, "packing": "none", "batch_size": 8, "samples": False}
    cfg = tiny_config(options, output_dir=str(tmp_path / "adapter"))
    train(dataclasses.replace(cfg, epochs=60, lr=1e-2, lora_r=16, lora_alpha=16, logging_steps=50))
    model, tokenizer, _ = load_for_inference(tmp_path / "adapter", device="cuda")
    sentences = [r["sentence"] for r in rows] + ["The Force is strong in you!", "Hi"]
    assert len({len(prompt_ids(tokenizer, s)) for s in sentences}) > 1  # padding really happens
    batched = generate_ids(model, tokenizer, sentences, max_new_tokens=24, batch_size=len(sentences))
    single = [generate_ids(model, tokenizer, [s], max_new_tokens=24)[0] for s in sentences]
    assert batched == single
    answers = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in batched[:8]]
    exact = sum(a == r["translation_extra"] for a, r in zip(answers, rows, strict=True))
    report["generation_memorised_of_8"] = exact
    assert exact >= 6, answers
