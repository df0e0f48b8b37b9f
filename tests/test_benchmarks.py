"""The benchmark suite on a CPU, and at the end the lab's tools: bench_loop.py runs a few steps of
the tiny model through the real loop and its output is complete and well-formed; the suite's tables
render from such output. Speed is never asserted (benchmarks report, they do not judge). GPU-only
figures are None here."""

import doctest
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_loop, common, report, run_all  # noqa: E402
from benchmarks.lab import live_peak  # noqa: E402

# Every number a result carries names its unit, or is a ratio, a count or a loss.
UNIT_SUFFIXES = ("_s", "_gib", "_per_s", "_per_token", "_per_step", "_params", "_steps", "_tflops", "_share")
UNITLESS = {"mfu", "loss_first", "loss_last"}


@pytest.fixture(scope="module")
def loop_result(tmp_path_factory) -> dict:
    """One bench_loop.py run: tiny preset, 4 rows x 32 tokens, 1 warm-up + 3 timed steps (~2 s).
    --no-shuffle keeps wrapped packing's one short row at the end of the epoch, out of the run."""
    out = tmp_path_factory.mktemp("bench") / "loop.jsonl"
    argv = "--preset tiny --batch-size 4 --max-length 32 --no-shuffle --warmup 1 --steps 3 --peak-tflops 1 --breakdown"
    argv = argv.split() + ["--json", str(out), "--name", "tiny-test"]
    assert bench_loop.main(argv) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1, "one measurement, one JSON line"
    return json.loads(lines[0])


def test_bench_loop_output_is_complete_and_well_formed(loop_result):
    r = loop_result
    missing = [k for k in common.RESULT_KEYS if k not in r]
    assert not missing
    assert r["name"] == "tiny-test" and r["pipeline"] == "yoda_raw"
    assert r["config"]["rows"] == 4 and r["config"]["tokens_per_row"] == 32
    assert r["config"]["precision"] == "fp32", "the resolved precision, not 'auto'"
    assert r["config"]["cuda_graph"] == "off", "the resolved --cuda-graph: auto is off on a CPU"
    assert (r["warmup_steps"], r["timed_steps"]) == (1, 3)
    for key, value in r.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert key.endswith(UNIT_SUFFIXES) or key in UNITLESS, f"{key} names no unit"
            assert math.isfinite(value), key
    positive = [
        "step_s",
        "step_min_s",
        "step_max_s",
        "tokens_per_step",
        "tokens_per_s",
        "supervised_tokens_per_s",
        "flops_per_token",
        "trainable_params",
        "total_params",
        "wall_s",
        "model_tflops_per_s",
        "mfu",
        "peak_tflops",
    ]
    for key in positive:
        assert r[key] > 0, key
    assert r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
    assert r["supervised_tokens_per_s"] < r["tokens_per_s"], "assistant-only labels supervise part of the tokens"
    # A median of full steps' token counts: a full step has >= 99% of rows x tokens (full_step_share).
    assert r["tokens_per_step"] == pytest.approx(4 * 32, rel=0.01)
    assert r["full_step_share"] == 1.0
    # tokens/s of the median step ~ tokens per step / median step time (exact for an odd count of full steps);
    # 2%: step_s is rounded to 0.1 ms of a few-ms CPU step, mfu to 4 significant digits.
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"], rel=0.02)
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tokens_per_s"] / 1e12, rel=0.02)
    for key in ("peak_allocated_gib", "peak_reserved_gib", "device_used_gib"):
        assert r[key] is None, f"{key}: torch's memory counters are CUDA's; None on a CPU"
    assert set(common.GPU_ONLY_KEYS) <= set(common.RESULT_KEYS)


def test_memory_breakdown_counts_the_tiny_model(loop_result):
    b = loop_result["memory_breakdown"]
    for key in (
        "weights_4bit_gib",
        "quant_state_gib",
        "weights_other_gib",
        "lora_params_gib",
        "lora_grads_gib",
        "optimizer_state_gib",
    ):
        assert b[key] > 0, key
    # Tiny model: LoRA r=8 on 4 modules x 2 layers, fp32 = 20,480 parameters x 4 bytes.
    # The breakdown rounds GiB to 6 decimals: within 5e-7; a wrong byte width is off by 2x.
    assert b["lora_params_gib"] == pytest.approx(loop_result["trainable_params"] * 4 / common.GIB, abs=1e-6)
    assert all(k.endswith("_gib") for k, v in b.items() if isinstance(v, float))


def fake_card(loop_result: dict, card_gib: float, precision: str, tokens: int, rows_fit: int) -> dict:
    """A card search's result as bench_loop.py --cards writes it (GPU figures made up)."""
    probes = [
        {"rows": rows_fit, "fits": True, "device_used_peak_gib": card_gib - 0.5, "error": None},
        {"rows": rows_fit + 1, "fits": False, "device_used_peak_gib": None, "error": "out of memory"},
    ]
    card = {"card_gib": card_gib, "margin_gib": 0.3, "usable_gib": card_gib - 0.3, "precision": precision}
    card |= {"tokens_per_row": tokens, "rows_fit": rows_fit, "rows_not_fit": rows_fit + 1, "max_rows": 64}
    config = (loop_result["config"] or {}) | {"rows": rows_fit, "tokens_per_row": tokens}
    return loop_result | {
        "name": f"card-{card_gib:g}gib-{precision}-{tokens}",
        "job": f"budgets-{card_gib:g}",
        "section": "budgets",
        "config": config,
        "card": card | {"probes": probes},
    }


def fake_gpu_suite(loop_result: dict) -> dict:
    """A suite shaped like the H200's, built from a CPU result with GPU fields filled in."""
    gpu = {"peak_allocated_gib": 2.9, "peak_reserved_gib": 3.3, "device_used_gib": 4.0, "mfu": 0.02}
    ours = loop_result | gpu | {"name": "ours", "job": "ours", "label": "yoda_raw, our defaults", "section": "headline"}
    ours["memory_breakdown"] = ours["memory_breakdown"] | {
        "activations_at_peak_gib": 0.4,
        "allocator_beyond_allocated_gib": 0.4,
        "peak_allocated_gib": 2.9,
        "peak_reserved_gib": 3.3,
        "device_used_gib": 4.0,
        "outside_torch_gib": 0.7,
        "mismatch_after_load_gib": 0.01,
        "mismatch_after_loop_gib": 0.02,
        "tolerance_gib": 0.1,
        "adds_up": True,
    }
    sft = loop_result | gpu | {"name": "sft", "job": "sft", "label": "TRL SFTTrainer", "section": "headline"}
    sft |= {"pipeline": "trl_sft", "tokens_per_s": loop_result["tokens_per_s"] / 2, "peak_allocated_gib": 5.8}
    grid = loop_result | gpu | {"name": "grid-4x32", "job": "grid", "label": "rows x tokens", "section": "grid"}
    keep = loop_result | gpu | {"name": "keep-2", "job": "keep-2", "section": "checkpointing"}
    keep |= {"label": "16 x 64, the last 2 layers not checkpointed", "tokens_per_s": 7777.0}
    cards = [fake_card(loop_result | gpu, 6, "bf16", 512, 5), fake_card(loop_result | gpu, 16, "fp16", 64, 64)]
    nothing = dict.fromkeys(common.RESULT_KEYS) | {"config": None, "name": "none"}
    cards.append(fake_card(nothing, 4, "bf16", 512, 0))
    carried = fake_card(nothing, 8, "bf16", 512, 5)  # 5 rows fitted the 6 GiB card: not run again
    carried["card"] |= {"rows_known_to_fit": 5, "probes": [{"rows": 6, "fits": False, "device_used_peak_gib": 7.8}]}
    cards.append(carried)
    suite = {
        "name": "test",
        "command": "python benchmarks/run_all.py",
        "date_utc": common.now_utc(),
        "gpu": "NVIDIA H200",
        "versions": common.versions(),
        "preset": "tutorial",
        "quick": False,
        "wall_s": 1.0,
        "results": [ours, sft, grid, *cards, keep],
        "failed": [],
        "skipped": [{"job": "fp16", "reason": "test"}],
    }
    suite["comparison"] = report.comparison(suite["results"])
    return suite


def test_suite_tables_render_from_results(loop_result):
    """report.py's Markdown and summary table from results shaped like the H200's."""
    suite = fake_gpu_suite(loop_result)
    # Ratios of the fake suite's figures, which are rounded to 0.1 tokens/s and 3 decimals of GiB.
    assert suite["comparison"]["ours"]["tokens_per_s_ratio"] == pytest.approx(2.0, rel=0.01)
    assert suite["comparison"]["ours"]["peak_allocated_ratio"] == pytest.approx(0.5)
    text = report.markdown(suite, "test")
    for heading in (
        "Ours vs TRL SFTTrainer",
        "Rows x tokens per step",
        "Where the memory goes",
        "What fits on a card",
        "What the recompute costs",
        "Not measured",
    ):
        assert heading in text
    recompute = text.split("What the recompute costs")[1].split("##")[0]
    assert "(every layer checkpointed)" in recompute and "| 16 x 64, the last 2 layers not checkpointed |" in recompute
    assert "7,777" in recompute
    assert "tokens/s x2.00" in text
    assert "benchmarks/README.md" in text, "the measuring rules are written once, there"
    assert "**H200's** speed" in text and "less 0.3 GiB" in text
    assert "| 6 GiB | bf16 (compute capability 8.0+) | 512 | 5 | 5.50 | 6 |" in text
    assert "| 16 GiB | fp16 (no bf16: a T4 and older cards) | 64 | 64 (the most tried) |" in text
    assert "| 4 GiB | bf16 (compute capability 8.0+) | 512 | none |" in text
    six = f"{cards_of(suite, 6)['tokens_per_s']:,.0f}"
    assert f"| 8 GiB | bf16 (compute capability 8.0+) | 512 | 5 (run on a smaller card) | 5.50 | 6 | {six} |" in text
    assert "x2.00" in report.short_table(suite)


@pytest.mark.parametrize("eager_middle_loss, verdict", [(2.01, "within 1%"), (2.04, "NOT within 1%")])
def test_learning_check_compares_every_step_with_the_eager_loop(loop_result, eager_middle_loss, verdict):
    """The benchmark's learning check: the worst step, not the last or the mean, decides; a drift of
    2% at one middle step fails it (the last step and the mean stay within 1%). The per-step losses
    come from bench_loop.py's own result."""
    assert len(loop_result["losses"]) == loop_result["warmup_steps"] + loop_result["timed_steps"]
    ours = loop_result | {"job": "learning-ours", "section": "learning", "losses": [3.0, 2.0, 1.0]}
    eager = loop_result | {"job": "learning-eager", "section": "learning", "losses": [3.0, eager_middle_loss, 1.0]}
    suite = fake_gpu_suite(loop_result)
    suite["results"] += [ours, eager]
    text = report.markdown(suite, "test")
    assert "## The same learning" in text and f"from the eager loop's ({verdict})" in text
    assert report.learning(suite["results"])["steps"] == 3


def cards_of(suite: dict, card_gib: float) -> dict:
    return next(r for r in suite["results"] if r.get("card", {}).get("card_gib") == card_gib)


def test_the_committed_h200_suite_renders_again(tmp_path):
    """report.py re-renders a saved suite: the tables of benchmarks/results/archive/h200 come out with the
    figures they were published with."""
    assert (
        report.main([str(ROOT / "benchmarks/results/archive/h200/h200.json"), "--out", str(tmp_path), "--no-plots"])
        == 0
    )
    text = (tmp_path / "h200.md").read_text()
    assert "| yoda_raw, our defaults | 16 x 64 | 0.518 | 1,978 | 1,086 | 3.1% | 2.81 | 3.20 | 4.68 |" in text
    assert "| 4 | 528 (2.42) | 2,544 (2.81) | 8,307 (4.55) |" in text
    assert "| **peak reserved** (= the sum) | **3.201** |" in text
    assert "yoda_raw, our defaults / SFTTrainer: tokens/s x0.95, peak allocated x0.84" in text


def test_parts_of_a_suite_render_as_one(loop_result, tmp_path):
    """Two `--only` runs, the second re-measuring one job: one table, the later figure, and a job
    that failed in the first but ran in the second no longer listed as not measured."""
    first, second = fake_gpu_suite(loop_result), fake_gpu_suite(loop_result)
    first["failed"] = [{"job": "grid", "error": "time"}]
    second["results"] = [r | {"tokens_per_s": 12345.0} for r in second["results"] if r.get("job") == "grid"]
    second |= {"command": "python benchmarks/run_all.py --only grid", "skipped": []}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, suite in zip(paths, (first, second), strict=True):
        path.write_text(json.dumps(suite))
    assert report.main([*map(str, paths), "--out", str(tmp_path / "out"), "--name", "both", "--no-plots"]) == 0
    merged = json.loads((tmp_path / "out" / "both.json").read_text())
    assert len(merged["results"]) == len(first["results"])
    assert next(r for r in merged["results"] if r["job"] == "grid")["tokens_per_s"] == 12345.0
    assert merged["failed"] == [] and merged["command"].endswith("--only grid")
    assert "12,345" in (tmp_path / "out" / "both.md").read_text()


def test_plots_are_written(loop_result, tmp_path):
    pytest.importorskip("matplotlib")
    report.write_plots(fake_gpu_suite(loop_result), tmp_path, "test")
    assert (tmp_path / "test_sweep.png").stat().st_size > 0
    assert (tmp_path / "test_memory.png").stat().st_size > 0  # peak memory by part, one panel
    assert (tmp_path / "test_cards.png").stat().st_size > 0  # what fits on a card: its own file, with card results


@pytest.mark.parametrize("first_guess", [1, 9, 30, 64])
@pytest.mark.parametrize("most_that_fit", [0, 1, 5, 37, 63, 64, 200])
def test_card_search_answers_only_what_it_measured(first_guess, most_that_fit):
    """A simulated card where rows fit up to `most_that_fit`: whatever the first guess, the answer
    is a measured fit, the next is a measured failure, and the two are within 10% (or one row)
    unless the search reached max_rows. Catches a search that reports an untried row count, stops
    short, or climbs past max_rows."""
    tried = {}

    def fits(rows):
        assert 1 <= rows <= 64 and rows not in tried, "each row count once, within max_rows"
        tried[rows] = rows <= most_that_fit
        return tried[rows]

    lo, hi = common.search_rows(fits, lambda: first_guess, max_rows=64, max_probes=12)
    assert lo <= min(most_that_fit, 64) < (hi or 65), "the true answer lies between the two measured ones"
    if lo:
        assert tried[lo] is True
    if hi is not None:
        assert tried[hi] is False and hi <= max(lo + 1, math.ceil(lo * 1.1))
    else:
        assert lo == 64, "without a measured failure the search must have reached max_rows"


def test_card_search_starts_above_what_a_smaller_card_fitted():
    tried = []
    assert common.search_rows(lambda rows: tried.append(rows) or False, lambda: 3, 64, 5, lo=64) == (64, None)
    assert tried == [], "64 rows fitted a smaller card: nothing left to try"
    lo, hi = common.search_rows(lambda rows: tried.append(rows) or rows <= 12, lambda: 3, 64, 5, lo=10)
    assert min(tried) > 10 and (lo, hi) == (12, 13)


def test_known_fit_comes_from_smaller_cards_of_the_same_precision(loop_result):
    results = [
        fake_card(loop_result, 6, "bf16", 512, 5),
        fake_card(loop_result, 6, "bf16", 64, 40),
        fake_card(loop_result, 16, "fp16", 512, 30),  # another precision
        fake_card(loop_result, 12, "bf16", 512, 20),  # a larger card
    ]
    job = next(j for j in run_all.plan(run_all.parse_args(["--out", "x"])) if j.name == "budgets-8gib")
    assert run_all.known_fit(results, job) == "64:40,512:5"


def test_card_search_stops_after_max_probes():
    calls = []
    lo, hi = common.search_rows(lambda rows: calls.append(rows) or True, lambda: 1, max_rows=64, max_probes=3)
    assert len(calls) == 3 and lo == calls[-1] and hi is None


def test_search_card_result_names_what_fitted(loop_result, monkeypatch, capsys):
    """search_card (bench_loop.py --cards) with runs faked by a memory line: its result is the run
    that fitted, and its `card` record lists every run, each also printed as it was measured (a search
    that dies later still leaves them in its log). Catches a result taken from a run that did not
    fit, or probes lost."""

    def fake_probe(cfg, args, card_gib, rows, tokens):
        used = 3.0 + 0.001 * rows * tokens
        result = loop_result | {"config": loop_result["config"] | {"rows": rows}}
        return {"rows": rows, "precision": "bf16", "fits": used <= card_gib - 0.3, "device_used_peak_gib": used,
                "result": result}  # fmt: skip

    monkeypatch.setattr(bench_loop, "probe", fake_probe)
    args, _ = bench_loop.parse_args(["--cards", "6", "--margin-gib", "0.3"])
    history = []
    result = bench_loop.search_card(types.SimpleNamespace(precision="bf16"), args, 6.0, 256, history, prior=None)
    card = result["card"]
    assert card["rows_fit"] == 10 and card["rows_not_fit"] == 11  # 3 + 0.256 x 10 = 5.56 <= 5.7 < 5.816
    assert result["config"]["rows"] == 10 and result["name"] == "card-6gib-256"
    assert [p["rows"] * 256 for p in card["probes"]] == [tokens for tokens, _ in history], "every run in the fit"
    assert all("result" not in p for p in card["probes"])
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("probe ")]
    assert printed == [
        f"probe 6 GiB x 256: {p['rows']} rows, fits {p['fits']}, NVML peak {p['device_used_peak_gib']} GiB"
        for p in card["probes"]
    ]


def test_card_prior_prefers_card_runs(loop_result):
    suite = fake_gpu_suite(loop_result)
    runs = [fake_card(loop_result, 8, "bf16", 256, rows) for rows in (10, 20)]
    for r in runs:
        r["card"]["probes"][0]["device_used_peak_gib"] = 3.0 + 0.001 * r["card"]["rows_fit"] * 256
    a, b = run_all.card_prior(runs)
    assert (a, b) == (pytest.approx(3.0), pytest.approx(0.001))  # a line through exact points, in fp64: 1e-6 is ample
    assert run_all.card_prior(suite["results"][:3]) is None, "one tokens-per-step point: no line"


@pytest.mark.parametrize("script", ["bench_loop.py", "bench_sft.py", "run_all.py"])
def test_scripts_explain_themselves(script):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "usage:" in done.stdout


@pytest.mark.slow  # run_all.py in subprocesses: a quarter of a minute on 2 cores
def test_run_all_lists_the_suite():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--out", "unused", "--list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    jobs = [line.split()[0] for line in done.stdout.splitlines()]
    assert done.returncode == 0
    names = {"ours", "sft", "grid", "grid-64x1024", "no-checkpointing", "bf16-base", "adamw-8bit", "adamw", "fp32"}
    assert names | {"fp16", "budgets-6gib", "budgets-16gib-fp16", "budgets-24gib"} <= set(jobs)


def test_only_takes_job_and_section_names():
    args = run_all.parse_args(["--out", "unused", "--only", "budgets,adamw"])
    jobs = run_all.plan(args)
    assert {j.name for j in jobs} == {"adamw"} | {
        f"budgets-{gib}gib" + ("-fp16" if precision == "fp16" else "") for gib, precision in run_all.CARDS
    }
    card = next(j for j in jobs if j.name == "budgets-16gib-fp16")
    assert card.args[card.args.index("--precision") + 1] == "fp16"


@pytest.mark.parametrize(
    "module, examples",
    [(common, 3), (report, 1), (live_peak, 1), (bench_loop, 1)],
    ids=["common", "report", "live_peak", "bench_loop"],
)
def test_examples_in_docstrings_hold(module, examples):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= examples and result.failed == 0


@pytest.mark.slow  # profiles tiny steps under torch.profiler: a quarter of a minute on 2 cores
def test_profile_step_splits_the_profiled_steps(tmp_path):
    """profile_step.py on the tiny model (a CPU): the profiled steps' time split by kind of work,
    written as JSON, Markdown and a trace. Catches steps timed across the wrong marks (a negative or
    zero step, or one shorter than the work inside it), or work left out of the buckets."""
    from benchmarks import profile_step

    argv = ["--out", str(tmp_path), "--name", "tiny", "--preset", "tiny", "--warmup", "2", "--steps", "2"]
    assert profile_step.main(argv) == 0
    result = json.loads((tmp_path / "tiny.json").read_text())
    assert result["step_s"] > 0 and 0 < result["kernel_s"] <= result["step_s"]
    # Each bucket and the total are rounded to 1e-5 s: a handful of buckets stay within 1e-4 of it.
    assert sum(result["buckets_s"].values()) == pytest.approx(result["kernel_s"], abs=1e-4)
    assert {"matmuls", "element-wise and other", "optimizer and clipping", "loss"} <= result["buckets_s"].keys()
    assert result["kernel_s"] >= 0.3 * result["step_s"]  # the step's work is in the buckets, not lost
    assert result["kernels_per_step"] > 0 and result["idle_s"] is None  # idle: a GPU figure
    assert "Where a step's time goes" in (tmp_path / "tiny.md").read_text()
    assert json.loads((tmp_path / "tiny_trace.json").read_text())["traceEvents"]


def test_profile_step_keeps_host_copies_out_of_the_kernels_time():
    """On a GPU with --offload-activations, the copies to and from host memory run on a stream of
    their own, beside the kernels: profile_step gives them a row and leaves them out of the kernels'
    sum, so the GPU's idle time is still the step less the main stream's kernels. Catches the
    copies summed with the kernels (the idle time would shrink by them, hiding waits)."""
    from benchmarks import profile_step

    cuda = torch.autograd.DeviceType.CUDA

    def kernel(name, ms):
        return types.SimpleNamespace(
            name=name, device_type=cuda, is_user_annotation=False, device_time_total=ms * 1e3, cpu_parent=None,
            time_range=types.SimpleNamespace(start=0, end=ms * 1e3),
        )  # fmt: skip

    events = [kernel("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", 6.0), kernel("Memcpy DtoH (Device -> Pinned)", 3.0)]
    result = profile_step.split(events, steps=1, wall_s=0.010, on_cuda=True)
    assert result["buckets_s"] == {"matmuls": 0.006, profile_step.HOST_COPIES: 0.003}
    assert result["kernel_s"] == 0.006 and result["idle_s"] == 0.004


def test_profile_step_puts_each_wait_on_the_kernel_that_ends_it():
    """Where the GPU waits: a gap between kernels goes to the kernel that starts after it, summed per
    name and step; a copy to host memory on its own stream does not fill the gap (the main stream
    still waited), and a gap under GAP_MIN_US (a launch's own latency) is no wait. Catches gaps put
    on the kernel before them, copies counted as work, or the time not divided by the steps."""
    from benchmarks import profile_step

    cuda = torch.autograd.DeviceType.CUDA

    def kernel(name, start_us, end_us):
        return types.SimpleNamespace(
            name=name, device_type=cuda, is_user_annotation=False, device_time_total=end_us - start_us,
            cpu_parent=None, time_range=types.SimpleNamespace(start=start_us, end=end_us),
        )  # fmt: skip

    events = [  # two steps: 'recompute' waits 1,000 us in each; 'add' follows 'matmul' 5 us after it
        *(kernel("matmul", 0, 2_000), kernel("Memcpy HtoD (Pinned -> Device)", 1_000, 2_900)),
        *(kernel("recompute", 3_000, 4_000), kernel("add", 4_005, 4_100)),
        *(kernel("matmul", 10_000, 12_000), kernel("recompute", 13_000, 14_000)),
    ]
    waits = profile_step.idle_before(events, steps=2)
    # Before the matmul, the 5,900 us between the steps; before 'recompute', 1,000 us in each step.
    assert waits == [["matmul", 0.00295, 0.5], ["recompute", 0.001, 1.0]]
    assert "add" not in profile_step.table(
        {"step_s": 0.01, "kernels_per_step": 3, "buckets_s": {}, "idle_s": None, "host_s": {},
         "host_calls_per_step": {}, "top_kernels_s": [], "idle_before_s": waits, "command": "c", "date": "d",
         "device": "GPU", "steps": 2}
    )  # fmt: skip


# --- The lab's tools (benchmarks/lab/), whose questions are still open: their arithmetic on a CPU ---


def test_matmul_peak_times_the_shapes_of_phi3_minis_projections(phi3_path):
    """The floor argument at 16 x 512 divides the step's FLOPs by the rate matmul_peak.py measures:
    its shapes must be the real model's projections (in, out features), read here from Phi-3-mini's
    config. Catches a wrong width (e.g. gate_up as 8192, not 2 x 8192), which would time other work."""
    from benchmarks.lab import matmul_peak

    config = json.loads((phi3_path / "config.json").read_text())
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    expected = {"qkv_proj": (hidden, qkv), "o_proj": (hidden, hidden), "gate_up_proj": (hidden, 2 * intermediate),
                "down_proj": (intermediate, hidden)}  # fmt: skip
    assert {name: (k, n) for name, k, n in matmul_peak.PHI3_LINEARS} == expected


@pytest.mark.parametrize(
    "tool, message",
    [
        ("matmul_peak", "matmul_peak.py needs a CUDA GPU"),
        ("outside_torch", "outside_torch.py reads a CUDA GPU's memory"),
    ],
)
def test_the_gpu_tools_on_a_cpu_are_one_clear_line(capsys, tool, message):
    """Without a GPU they stop with one line saying why, not a CUDA traceback."""
    import importlib

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"benchmarks.lab.{tool}").main([])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]


def test_whole_run_split_parts_the_wall_time_around_the_runs_own(tmp_path, capsys):
    """whole_run_split.py's arithmetic on a stand-in run that sleeps 1.2 s, prints a time line
    claiming 1 s, then sleeps 0.6 s before exiting: before run.py ~0.2 s, after its last line ~0.6
    s, and the three parts add up to the wall time. A failed run is one line naming its log.
    Catches stamps taken at the wrong moment (after the run, or from the wrong line) and parts that
    do not add up."""
    from benchmarks.lab import whole_run_split

    line = "time: 1 s: 0 s importing, 0 s starting, 1 s loading, 2 s training, 1 s saving"  # its parts made up
    stand_in = f"import time; time.sleep(1.2); print({line!r}); time.sleep(0.6)"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    split = whole_run_split.timed_run("stand-in", [sys.executable, "-c", stand_in], env, tmp_path)
    assert split["run_py_s"] == 1.0 and split["time_line"] == line
    assert split["model_to_adapter_s"] == 4.0  # loading, training and saving: not importing or starting
    # Wall-clock bounds around the stand-in's sleeps (0.2 s before its line, 0.6 s after): room for a
    # slow Python start on a busy machine; a stamp from the wrong line is off by 0.6 s or more.
    assert 0.1 <= split["before_run_py_s"] <= 0.8, split
    assert 0.55 <= split["after_last_line_s"] <= 1.2, split
    parts = split["before_run_py_s"] + split["run_py_s"] + split["after_last_line_s"]
    assert parts == pytest.approx(split["wall_s"], abs=0.05)  # four figures, each rounded to 0.01 s
    stamped = (tmp_path / "stand-in.log").read_text().split()
    assert float(stamped[0]) >= 1.2 and stamped[1:3] == ["time:", "1"]  # the line, stamped as it came

    with pytest.raises(SystemExit) as stop:
        whole_run_split.timed_run("broken", [sys.executable, "-c", "raise SystemExit(3)"], env, tmp_path)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: broken: the run failed (exit status 3); its output is in {tmp_path / 'broken'}.log"]


@pytest.mark.slow  # SFTTrainer's whole tiny-preset run (30 epochs) in a subprocess: minutes on 2 cores
def test_whole_run_split_times_sftrainers_whole_run_from_its_model_load(tmp_path, capsys):
    """The SFTTrainer side of whole_run_split.py (--sft), on the tiny model on a CPU: its wall time,
    and within it bench_sft.py's own time from the model's load to the saved adapter; a failed run
    is one line naming its log. Catches the two figures swapped or read from the wrong record."""
    from benchmarks.lab import whole_run_split

    sft = whole_run_split.timed_sft(["--preset", "tiny"], dict(os.environ), tmp_path)
    assert 0 < sft["model_to_adapter_s"] < sft["wall_s"], sft
    assert json.loads((tmp_path / "sft.jsonl").read_text())["name"] == "sft-whole-run"

    with pytest.raises(SystemExit) as stop:
        whole_run_split.timed_sft(["--warmup", "0"], dict(os.environ), tmp_path)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: sft: the run failed (exit status 2); its output is in {tmp_path / 'sft.log'}"]


def test_bandwidth_table_splits_inductors_log_into_the_layers_two_graphs(tmp_path, capsys):
    """bandwidth_table.py on log lines shaped as inductor writes them (colour codes, a graph's total
    line, numbering that restarts at the backward graph): forward and backward sums, and a step as
    layers x (2 forward passes + backward). An empty log is one line saying how to make one.
    Catches the backward kernels counted as forward ones (no split at the restart), the graph totals
    counted as kernels, or the recompute left out."""
    from benchmarks.lab import bandwidth_table

    prefix = "I1129 11:57:09.377000 1129 torch/_inductor/runtime/triton_heuristics.py:2200] "
    log = "\n".join(
        [
            prefix + "1.000ms    \t2.000 GB \t 2000.00GB/s \t triton_red_fused_mean_0",
            prefix + "\x1b[31m0.500ms    \t0.500 GB \t 1000.00GB/s \t triton_poi_fused_add_1\x1b[39m",
            prefix + "1.50ms   \t 2.50 GB\t 1666.67GB/s",  # the forward graph's total: not a kernel
            prefix + "2.000ms    \t5.000 GB \t 2500.00GB/s \t triton_poi_fused_mul_0",
            prefix + "1.50ms   \t 2.50 GB\t 1666.67GB/s",
        ]
    )
    kernels = bandwidth_table.read_kernels(log)
    assert [(k["graph"], k["name"]) for k in kernels] == [
        ("forward", "triton_red_fused_mean_0"),
        ("forward", "triton_poi_fused_add_1"),
        ("backward", "triton_poi_fused_mul_0"),
    ]
    f = bandwidth_table.step_figures(kernels, layers=4, forward_passes=2, peak_tb_s=4.5)
    assert f["forward"] == {"ms": 1.5, "gb": 2.5} and f["backward"] == {"ms": 2.0, "gb": 5.0}
    assert f["step_ms"] == 4 * (2 * 1.5 + 2.0) and f["step_gb"] == 4 * (2 * 2.5 + 5.0)
    assert f["step_ms_at_peak"] == pytest.approx(40.0 / 4.5)  # fp64 arithmetic: approx's 1e-6 is ample

    (tmp_path / "empty.txt").write_text("nothing timed here\n")
    with pytest.raises(SystemExit) as stop:
        bandwidth_table.main([str(tmp_path / "empty.txt"), "--peak-tb-s", "4.8"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: no kernel timings in the log: run with TORCHINDUCTOR_PROFILE=1 TORCH_LOGS=inductor"]


def test_least_traffic_counts_each_forward_twice_and_adds_the_step_up():
    """least_traffic.py's bound: every forward row counted once per forward pass (two with the
    checkpointing recompute), the masks once, LoRA's matmuls apart from the element-wise work, and
    the shortest step the sum of the profiled matmuls and attention with the dequantizations and
    the element-wise bytes at the peak. Catches the recompute left out, LoRA's matmuls counted in
    the element-wise time (they are in the profile's matmul time), or a step that drops a part."""
    from benchmarks.lab import least_traffic as lt

    forward = sum(fwd for _, fwd, _, _ in lt.rows())
    assert lt.elements_per_token(forward_passes=2) - lt.elements_per_token(forward_passes=1) == forward
    assert lt.elements_per_token() == lt.elements_per_token(lora=False) + lt.elements_per_token(lora=True)
    f = lt.bound(tokens=1000, matmul_ms=100.0, attention_ms=10.0, peak_tb_s=2.0)
    # fp64 arithmetic of the same formula: approx's default 1e-6 relative is ample.
    assert f["elementwise_ms"] == pytest.approx(lt.elements_per_token(lora=False) * 2 * 1000 * 32 / 1e9 / 2.0)
    assert f["step_ms"] == pytest.approx(110.0 + f["dequant_ms"] + f["elementwise_ms"])
    assert f["tokens_per_s"] == pytest.approx(1000 / f["step_ms"] * 1000)
    # --fp8: the casts add to the step; their weight part is the same at any token count, the rest
    # grows with the tokens (both forwards' inputs and the gradients).
    f8 = lt.bound(tokens=1000, matmul_ms=100.0, attention_ms=10.0, peak_tb_s=2.0, fp8=True)
    assert f8["step_ms"] == pytest.approx(f["step_ms"] + f8["casts_ms"]) and f8["casts_ms"] > 0
    weights = lt.fp8_casts_gb(0)
    assert weights == pytest.approx(32 * sum(k * n for _, k, n in lt.PHI3_LINEARS) * 8 / 1e9)
    assert lt.fp8_casts_gb(2000) - weights == pytest.approx(2 * (lt.fp8_casts_gb(1000) - weights))


def test_peak_tensors_lists_what_is_alive_at_the_peak(tmp_path, capsys):
    """peak_tensors.py on a made-up snapshot: a layer input kept (yoda_raw), a 150 MiB block whose
    free is requested (another stream still reads it) before a 200 MiB one is allocated and completed
    only after, a 50 MiB one later, and a block freed that was allocated before the recording. The
    peak is 1 + 150 + 200 MiB, and its table names the places of the blocks alive then, by the
    innermost frame outside torch, else torch's. Catches frees counted when requested (the peak would
    be 1 + 200 + 50), a peak taken at the largest single block, or torch's own frames named instead
    of the caller's."""
    import pickle

    from benchmarks.lab import peak_tensors

    mib = 2**20

    def frames(*places):
        return [{"filename": f"/site-packages/{path}", "line": line, "name": name} for path, line, name in places]

    torch_frame = ("torch/nn/modules/module.py", 1, "_call_impl")
    layer = frames(torch_frame, ("yoda_raw/offload.py", 10, "pack"))
    mlp = frames(torch_frame, ("transformers/models/phi3/modeling_phi3.py", 20, "forward"))
    events = [
        {"action": "alloc", "addr": 1, "size": 1 * mib, "frames": layer},
        {"action": "alloc", "addr": 2, "size": 150 * mib, "frames": frames(torch_frame)},
        {"action": "free_requested", "addr": 2, "size": 150 * mib, "frames": []},
        {"action": "alloc", "addr": 3, "size": 200 * mib, "frames": mlp},
        {"action": "free_completed", "addr": 2, "size": 150 * mib, "frames": []},
        {"action": "alloc", "addr": 4, "size": 50 * mib, "frames": mlp},
        {"action": "free_completed", "addr": 99, "size": 7 * mib, "frames": []},
        {"action": "free_completed", "addr": 3, "size": 200 * mib, "frames": []},
    ]
    peak, alive, unseen = peak_tensors.replay(events)
    assert (peak, sorted(alive), unseen) == (351 * mib, [1, 2, 3], 7 * mib)
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps({"device_traces": [events]}))
    assert peak_tensors.main([str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "peak 351.0 MiB" in table[0] and "7.0 MiB freed" in table[0]
    assert [line.split(maxsplit=2)[2] for line in table[2:]] == [
        "transformers/models/phi3/modeling_phi3.py:20 forward",
        "torch/nn/modules/module.py:1 _call_impl",
        "yoda_raw/offload.py:10 pack",
    ]


def test_gap_waits_puts_each_gap_down_to_the_host_or_the_copy_it_waited_for(tmp_path, capsys):
    """gap_waits.py on a trace of two steps, the work on stream 7 but for a graph's kernel on stream
    15 that fills what would be a gap on stream 7 (no idle time): a 40 us gap that a 48 MiB copy to
    host on stream 13 ends inside; a 60 us gap before a kernel whose launch (inside aten::ne) ended
    inside it, the host having waited in a synchronize (inside aten::item) through most of it, while
    a copy also ended inside it; an 18 us gap (under 20: not counted); a 60 us gap with nothing
    inside it, after a copy that ended before it began; and a 60 us gap before a kernel launched
    just after the host drew a batch (a data loader's op through most of the gap, a short copy call
    and a short op inside it).
    Catches a gap counted on one stream while another works, a copy blamed for a gap it ended
    before, the host's gap blamed on a copy that happens to end then, the wrong runtime call or op
    named as what held the host, and the per-step division."""
    import gzip

    from benchmarks.lab import gap_waits

    def gpu(cat, name, stream, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
                "args": {"stream": stream, **args}}  # fmt: skip

    def launch(correlation, ts, name="cudaLaunchKernel", dur=5):
        return {"ph": "X", "cat": "cuda_runtime", "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur,
                "args": {"correlation": correlation}}  # fmt: skip

    def op(name, ts, dur):
        return {"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": 1, "ts": ts, "dur": dur, "args": {}}

    mib = 2**20
    to_host, to_gpu = "Memcpy DtoH (Device -> Pinned)", "Memcpy HtoD (Pinned -> Device)"
    events = [
        gpu("kernel", "k0", 7, -200, 100, correlation=7),
        gpu("kernel", "replay", 15, -110, 110, correlation=8),  # stream 7 idle from -100 to 0, the GPU not
        gpu("kernel", "k1", 7, 0, 100, correlation=1),
        gpu("gpu_memcpy", to_host, 13, 20, 120, correlation=9, bytes=48 * mib),
        gpu("kernel", "k2", 7, 140, 100, correlation=2),  # gap 100-140: the copy to host ended at 140
        gpu("gpu_memcpy", to_gpu, 13, 250, 30, correlation=10, bytes=6 * mib),
        gpu("kernel", "count", 7, 300, 10, correlation=3),  # gap 240-300: launched at 290-295, the copy ended at 280
        gpu("kernel", "k4", 7, 328, 10, correlation=4),  # gap 310-328: 18 us
        gpu("gpu_memcpy", to_host, 13, 320, 10, correlation=11, bytes=2 * mib),
        gpu("kernel", "k5", 7, 398, 10, correlation=5),  # gap 338-398: the copy ended at 330, the launch long before
        op("aten::item", 240, 38),
        launch(20, 241, "cudaStreamSynchronize", 36),  # the host held up through most of the gap 240-300
        launch(21, 279, "cudaMemcpyAsync", 2),
        op("aten::ne", 280, 20),
        launch(3, 290),
        launch(2, 10),
        launch(5, 30),
        gpu("kernel", "count", 7, 468, 10, correlation=6),  # gap 408-468: the host drew a batch meanwhile
        op("ProfilerStep#7", 0, 500),  # around everything: not what held the host, the op inside it is
        op("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", 400, 55),
        op("aten::copy_", 410, 3),
        launch(22, 412, "cudaMemcpyAsync", 2),
        op("aten::ne", 455, 12),
        launch(6, 460),
    ]
    path = tmp_path / "levers_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert gap_waits.main([str(path), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "0.11 ms a step, 2.00 gaps a step" in out
    assert "| Memcpy DtoH (Device -> Pinned), 48.0 MiB | 0.02 | 0.50 |" in out
    assert "| the host: aten::ne, after cudaStreamSynchronize in aten::item | 0.03 | 0.50 |" in out
    assert "| not known | 0.03 | 0.50 |" in out
    loader = "enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__"
    assert f"| the host: aten::ne, while in {loader} | 0.03 | 0.50 |" in out
    assert "HtoD" not in out and "2.0 MiB" not in out

    cut = tmp_path / "cut_trace.json"  # a trace cut short (a full disk, a copy stopped): one line
    cut.write_text(json.dumps({"traceEvents": events})[:200])
    with pytest.raises(SystemExit) as stop:
        gap_waits.main([str(cut)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_each_result_names_the_allocator_settings_it_ran_with(tmp_path, monkeypatch):
    """Expandable segments change a run's memory and are an environment variable, which no option of
    run.py records: a result that left it out could not be told from one without it."""
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the older name, the one the calls used
    out = tmp_path / "loop.jsonl"
    argv = "--preset tiny --batch-size 2 --max-length 16 --warmup 1 --steps 1 --peak-tflops 1".split()
    assert bench_loop.main(argv + ["--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["alloc_conf"] == "expandable_segments:True"
