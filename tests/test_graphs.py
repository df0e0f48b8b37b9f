"""The CUDA-graph path's CPU-checkable parts: what it feeds the model, and where it refuses to run.

The graph itself needs a GPU (tests/test_gpu.py compares it with the eager loop there). What it
relies on can be checked here: a micro-batch padded to the graph's fixed (B, T) and run without an
attention mask gives the eager loss and gradients exactly.
"""

import contextlib
import json

import pytest
import torch
import torch._functorch.config  # --compile-memory-budget sets activation_memory_budget
from conftest import assert_close_up_to_rounding, rounding_tolerance

import run
from tests.common import batch_of, refused_in_one_line
from yoda_raw.chat import IGNORE
from yoda_raw.fast.graphs import CAUSAL_SDPA, GraphStep
from yoda_raw.loss import token_loss_sum
from yoda_raw.offload import OffloadActivations
from yoda_raw.packing import Collator


def lora_like_grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padded_batch_without_a_mask_gives_the_eager_loss_and_gradients(
    tiny_model, tiny_tokenizer, attention, monkeypatch
):
    """A short batch (3 rows, the last one shorter) copied into a 5 x 12 buffer and run with no
    attention mask (plain causal attention) gives the same loss sum and the same gradients as the
    collated batch with its padding mask: right padding is invisible to causal attention, and
    padded rows have no supervised label. For SDPA and eager attention. Catches left padding, pad
    rows with real labels, a loss that counts padded positions; and, for SDPA, a graph that hands
    attention a ready-made mask again (it would compute all of the scores, not the causal half)."""
    tiny_model.set_attn_implementation(attention)
    rows = [
        {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12], "labels": [IGNORE, IGNORE, 7, 8, 9, 10, 11, 12]},
        {"input_ids": [13, 14, 15, 16, 17, 18, 19, 20], "labels": [13, 14, 15, IGNORE, 17, 18, 19, 20]},
        {"input_ids": [21, 22, 23, 24], "labels": [IGNORE, 22, 23, 24]},
    ]
    batch = Collator(tiny_tokenizer.pad_token_id)(rows)
    assert batch["attention_mask"].min() == 0  # the mask really matters to the eager batch

    token_loss_sum(tiny_model, batch).backward()
    eager_loss, eager_grads = None, lora_like_grads(tiny_model)
    with torch.no_grad():
        eager_loss = token_loss_sum(tiny_model, batch)
    tiny_model.zero_grad(set_to_none=True)

    captured = GraphStep(tiny_model, batch_size=5, max_length=12, pad_id=tiny_tokenizer.pad_token_id, device="cpu")
    captured._load(batch)
    assert set(captured.batch) == {"input_ids", "labels"}  # no mask: nothing that says where padding is
    assert (captured.batch["labels"][3:] == IGNORE).all() and (captured.batch["labels"][:, 8:] == IGNORE).all()
    sdpa_calls = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_spy(*args, **kwargs):
        implementation = tiny_model.config._attn_implementation
        sdpa_calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal"), implementation))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_spy)
    loss = captured.loss_and_backward()  # what the warm-up runs and the capture records
    if attention == "sdpa":
        # Every layer's attention: SDPA's own causal masking, no mask tensor, under the graph's
        # own name for SDPA (with plain "sdpa" some transformers versions build a mask while a
        # stream is capturing); the model's own attention comes back afterwards.
        assert len(sdpa_calls) == tiny_model.config.num_hidden_layers
        assert all(mask is None and causal and name == CAUSAL_SDPA for mask, causal, name in sdpa_calls), sdpa_calls
    assert tiny_model.config._attn_implementation == attention
    # The 5 x 12 buffer changes the shapes and so the order each kernel adds in: equal up to fp32
    # rounding of the tiny model's sums (conftest), 7.2e-5 of each tensor's size; a padded position
    # in the loss or attended to changes them by a whole token's share, percents.
    assert_close_up_to_rounding(loss.detach(), eager_loss, name="loss sum")
    grads = lora_like_grads(tiny_model)
    assert grads.keys() == eager_grads.keys() and grads
    for name in grads:
        assert_close_up_to_rounding(grads[name], eager_grads[name], name=name)


def test_a_full_batch_after_a_short_one_leaves_no_stale_padding(tiny_tokenizer):
    """The buffers are reused: a short batch pads them, and the next full batch must overwrite
    every position (no labels of an earlier batch survive)."""
    captured = GraphStep(torch.nn.Identity(), batch_size=2, max_length=4, pad_id=0, device="cpu")
    captured._load({"input_ids": torch.tensor([[1, 2]]), "labels": torch.tensor([[1, 2]])})
    full = {"input_ids": torch.arange(8).view(2, 4), "labels": torch.arange(8).view(2, 4) + 10}
    captured._load(full)
    assert torch.equal(captured.batch["input_ids"], full["input_ids"])
    assert torch.equal(captured.batch["labels"], full["labels"])
    captured._load({"input_ids": torch.tensor([[7]]), "labels": torch.tensor([[7]])})
    assert captured.batch["labels"].tolist() == [[7, IGNORE, IGNORE, IGNORE], [IGNORE] * 4]


def test_cuda_graph_on_a_cpu_is_one_clear_line(tmp_path, capsys):
    """--cuda-graph on where it cannot run stops before anything loads, with one line that says why;
    auto (the default) falls back to the eager loop and says so in the saved config."""
    code = run.main(["--preset", "tiny", "--cuda-graph", "on", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: --cuda-graph on needs a CUDA GPU"), err
    assert not (tmp_path / "out").exists()


def test_auto_resolves_to_what_the_run_does(tmp_path, tiny_config):
    """The default, auto, is saved as what it became: off on a CPU, so run_config.json tells the truth."""
    from yoda_raw.train import main

    main(tiny_config(max_steps=1, samples=False, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "run_config.json").read_text())
    assert saved["cuda_graph"] == ("on" if torch.cuda.is_available() else "off")
    assert saved["compile_layers"] == saved["cuda_graph"]  # auto follows the graph


@pytest.mark.slow  # two runs, one compiling every layer on a CPU (on a GPU the default; the GPU suite runs it)
def test_compiled_layers_train_as_the_plain_ones(tmp_path, tiny_config):
    """--compile-layers on (here on a CPU, where it is not the default) runs the same arithmetic as
    the plain layers: the same per-step losses. Catches a compiled layer that drops the LoRA
    adapters or the attention mask, or a model that was never compiled (run_config says on)."""
    from yoda_raw.train import main

    losses = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        run = main(tiny_config(max_steps=2, logging_steps=1, samples=False, lora_dropout=0.0, output_dir=str(out),
                               compile_layers=setting))  # fmt: skip
        losses[setting] = [r["loss"] for r in run.fit.log]
        assert json.loads((out / "run_config.json").read_text())["compile_layers"] == setting
    compiled = [m for m in run.model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == run.model.config.num_hidden_layers
    # Inductor fuses the layer's ops and adds in its own order: equal up to fp32 rounding of the
    # tiny model's sums over 2 steps (conftest), 1.4e-4 of the loss; a dropped adapter or mask
    # changes it by percents.
    bound = rounding_tolerance(max(losses["off"]), steps=2)
    assert losses["on"] == pytest.approx(losses["off"], rel=0, abs=bound)


@pytest.mark.slow  # compiles the layers on a CPU, then a full end-of-run report: half a minute on 2 cores
def test_the_end_of_run_report_runs_the_compiled_layers_eagerly(tmp_path, monkeypatch, tiny_config):
    """With --compile-layers on, the held-out evaluation and translations after training compile
    nothing: through the compiled layers, the no-gradient mode and every length that generation
    passes through would compile them again, 8 times, then torch stops with a warning (on a GPU,
    seconds each). Catches the report run through the compiled layers."""
    from torch._dynamo.utils import counters

    from yoda_raw import train

    compiled_graphs = []
    report = train.end_of_run_report

    def counting_report(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        result = report(*args, **kwargs)
        compiled_graphs.append(counters["stats"]["unique_graphs"] - before)
        return result

    monkeypatch.setattr(train, "end_of_run_report", counting_report)
    run = train.main(tiny_config(max_steps=2, eval_fraction=0.2, compile_layers="on", output_dir=str(tmp_path)))
    assert run.report["eval_conversations"] and run.report["samples"][0]["translation"] is not None  # it ran
    assert compiled_graphs == [0]


def test_the_first_step_runs_eagerly_on_the_padded_buffers(tiny_model, tiny_tokenizer):
    """Step one of the graph path is the eager warm-up: it returns the collated batch's loss sum and
    leaves the gradient of loss / n_supervised, the eager loop's contract, before anything is captured."""
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, 6, 7, 8, 9]}, {"input_ids": [10, 11], "labels": [10, 11]}]
    batch = Collator(tiny_tokenizer.pad_token_id)(rows)
    n_supervised = (batch["labels"][:, 1:] != IGNORE).sum()
    eager = token_loss_sum(tiny_model, batch)
    (eager / n_supervised).backward()
    eager_grads = lora_like_grads(tiny_model)
    tiny_model.zero_grad(set_to_none=True)

    captured = GraphStep(tiny_model, batch_size=4, max_length=8, pad_id=tiny_tokenizer.pad_token_id, device="cpu")
    loss = captured.forward_backward([batch], n_supervised)
    assert captured.warmed_up and captured.graph is None
    # Padded buffers, other shapes: equal up to fp32 rounding of the tiny model's sums (conftest).
    assert_close_up_to_rounding(loss, eager.detach(), name="loss sum")
    for name, grad in lora_like_grads(tiny_model).items():
        assert_close_up_to_rounding(grad, eager_grads[name], name=name)


def test_out_of_memory_in_the_capture_comes_out_as_itself_with_offloading(tiny_model, tiny_tokenizer, monkeypatch):
    """Out of memory inside the CUDA graph's capture must go up as itself: --auto-batch-size and the
    card search answer it with fewer rows. CUDA cannot end a capture while another stream's work is
    not joined back into it, and offloading's copies, on a stream of their own, join at the
    backward's end, which the error skips: ending the capture would then fail with an error of its
    own, hiding the first (as it did on the GPU). The capture is stood in for here (no GPU): the
    copies must be joined before it ends, and the error go up unchanged, the half-made graph dropped."""
    events = []

    @contextlib.contextmanager
    def capture(graph):  # torch.cuda.graph's shape: record, then end the capture whatever happened
        try:
            yield
        finally:
            events.append("capture ends")

    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    offload = OffloadActivations(tiny_model, torch.device("cpu"))
    monkeypatch.setattr(offload, "settle", lambda: events.append("copies joined"))
    step = GraphStep(tiny_model, 2, 8, tiny_tokenizer.pad_token_id, torch.device("cpu"), offload=offload)

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.20 GiB.")

    monkeypatch.setattr(step, "loss_and_backward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate") as info:
        step._capture_or_clean_up()
    assert events == ["copies joined", "capture ends"] and step.graph is None
    assert info.value.in_graph_capture  # what the retry's line says: the batch fit without the graph


def test_compile_layers_without_triton_on_a_gpu(monkeypatch):
    """On a GPU torch.compile needs Triton (compute capability 7.0+, the package installed): without
    it auto stays off, and on is one line naming the fix, before anything loads. A CPU compiles
    without Triton, so there nothing changes."""
    from yoda_raw.errors import YodaError
    from yoda_raw.fast import compile

    monkeypatch.setattr(compile, "has_triton", lambda: False)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert compile.resolve("auto", "on", gpu) == "off"
    with pytest.raises(YodaError, match=r"^--compile-layers on needs Triton .*; use --compile-layers off$"):
        compile.resolve("on", "on", gpu)
    assert compile.resolve("on", "off", cpu) == "on"
    monkeypatch.setattr(compile, "has_triton", lambda: True)
    assert compile.resolve("auto", "on", gpu) == "on"
    assert compile.resolve("auto", "off", gpu) == "off"


def test_compiled_layers_compile_in_the_process_unless_told_otherwise(monkeypatch, tiny_qlora):
    """compile_layers has inductor compile in this process (no pool of worker processes to start:
    that was slower for one layer's few kernels), unless TORCHINDUCTOR_COMPILE_THREADS says how many
    (a user's choice stays). Catches the setting dropped, or overriding the user's variable."""
    import torch._inductor.config as inductor

    from yoda_raw.fast.compile import compile_layers

    monkeypatch.setattr(inductor, "compile_threads", None)  # inductor's "not decided yet"
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    compile_layers(tiny_qlora())
    assert inductor.compile_threads == 1

    monkeypatch.setattr(inductor, "compile_threads", None)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "4")
    compile_layers(tiny_qlora())
    assert inductor.compile_threads is None  # left to inductor, which reads the variable


@pytest.mark.slow  # compiles the tiny model's halves for three shapes: about a minute on 2 CPU cores
def test_compiled_layers_keep_compiling_new_batch_shapes(tiny_qlora, tiny_tokenizer):
    """A run meets several batch shapes (--auto-batch-size's retries, a short last batch, the MLP's
    last chunk), each a compiled code more for the one code all layers share. torch gives up past
    its cap (8) and runs new shapes eagerly; on a GPU a forward run compiled and a recompute run
    eagerly then save other tensors, and checkpointing stops the run. Here torch's cap is lowered to
    1 and giving up made an error, so that three shapes stand in for nine. Catches compile_layers
    leaving torch's cap as it is."""
    import torch._dynamo.config as dynamo

    from yoda_raw.fast.compile import compile_layers
    from yoda_raw.halves import split_layers

    model = tiny_qlora()
    split_layers(model, mlp_chunk=20)  # chunks of 20 tokens: rows of 16 leave a shorter last chunk
    torch._dynamo.reset()
    before = dynamo.recompile_limit
    try:
        # dynamo's own patch, which puts both settings back after (pytest's monkeypatch loses them).
        with dynamo.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
            compile_layers(model)
            model.train()
            for rows in (1, 2, 3):
                loss = token_loss_sum(model, batch_of(tiny_tokenizer, rows))
                loss.backward()
                assert torch.isfinite(loss)
    finally:
        torch._dynamo.reset()
    assert dynamo.recompile_limit == before and not dynamo.fail_on_recompile_limit_hit  # as they were


@pytest.mark.slow  # compiling the tiny layers twice takes a minute or more on a CPU
def test_compile_memory_budget_keeps_less_for_the_backward_and_the_same_gradients(tiny_qlora, tiny_tokenizer):
    """--compile-memory-budget below 1: the compiled layers hand their backward less than at 1 (the
    partitioner recomputes the rest inside the backward), and the loss and LoRA gradients stay those
    of budget 1. Without checkpointing, so that what the compiled forward keeps is what a
    saved-tensors hook sees. Catches the budget not reaching the partitioner (the same bytes kept),
    or a recompute that computes something else."""
    from yoda_raw.fast.compile import compile_layers

    rows = [{"input_ids": list(range(5, 37)), "labels": [IGNORE] * 4 + list(range(9, 37))} for _ in range(4)]
    batch = Collator(tiny_tokenizer.pad_token_id)(rows)
    kept, results = {}, {}
    try:
        for budget in (1.0, 0.1):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = tiny_qlora(gradient_checkpointing=False)
            compile_layers(model, budget)
            weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
            sizes = []

            def pack(tensor, sizes=sizes, weights=weights):
                if tensor.untyped_storage().data_ptr() not in weights:  # weights are kept anyway
                    sizes.append(tensor.numel() * tensor.element_size())
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = token_loss_sum(model, batch)
            loss.backward()
            kept[budget] = sum(sizes)
            results[budget] = (loss.detach(), lora_like_grads(model))
    finally:
        torch._dynamo.reset()
        torch._functorch.config.activation_memory_budget = 1.0  # a setting of the process: back to the default
    assert kept[0.1] < 0.8 * kept[1.0], kept  # the tiny model's MLP outputs: a fifth or more of what is kept
    (loss, grads), (budget_loss, budget_grads) = results[1.0], results[0.1]
    # The same sums, recomputed rather than kept (inductor may fuse them otherwise): equal up to fp32
    # rounding of the tiny model's step (conftest: 7.2e-5 of each tensor's size).
    assert_close_up_to_rounding(budget_loss, loss, name="loss sum")
    assert budget_grads.keys() == grads.keys() and grads
    for name in grads:
        assert_close_up_to_rounding(budget_grads[name], grads[name], name=name)


@pytest.mark.parametrize("budget", ["0.5", "1.5"])
def test_compile_memory_budget_where_it_cannot_work_is_one_line(tmp_path, capsys, budget):
    """A budget for layers that are not compiled (a CPU's default) would do nothing, and one outside
    [0, 1] means nothing: one line each, exit 2, nothing written."""
    expected = {
        "0.5": "error: --compile-memory-budget 0.5 shares out what compiled layers keep for their backward, and "
        "the layers are not compiled here; drop it, or add --compile-layers on",
        "1.5": "error: --compile-memory-budget must be in [0, 1], got 1.5",
    }
    argv = ["--preset", "tiny", "--compile-memory-budget", budget]
    assert refused_in_one_line(argv, tmp_path / "run", capsys) == expected[budget]
