"""The benchmark scripts on a CPU: bench_loop.py runs a few steps of the tiny model through the
real loop and its output is complete and well-formed; the suite's tables render from such output.
Speed is never asserted (benchmarks report, they do not judge). GPU-only figures are None here."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bench_loop, common, run_all  # noqa: E402

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
    assert r["tokens_per_step"] == pytest.approx(4 * 32, rel=0.01)
    assert r["full_step_share"] == 1.0
    # tokens/s of the median step ~ tokens per step / median step time (exact for an odd count of full steps)
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
    assert b["lora_params_gib"] == pytest.approx(loop_result["trainable_params"] * 4 / common.GIB, abs=1e-6)
    assert all(k.endswith("_gib") for k, v in b.items() if isinstance(v, float))


def fake_gpu_suite(loop_result: dict) -> dict:
    """A suite shaped like the H200's, built from a CPU result with GPU fields filled in."""
    gpu = {"peak_allocated_gib": 2.9, "peak_reserved_gib": 3.3, "device_used_gib": 4.0, "mfu": 0.02}
    ours = loop_result | gpu | {"job": "ours", "label": "yoda_raw, our defaults", "section": "headline"}
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
    sft = (
        loop_result
        | gpu
        | {
            "job": "sft",
            "label": "TRL SFTTrainer",
            "section": "headline",
            "pipeline": "trl_sft",
            "tokens_per_s": loop_result["tokens_per_s"] / 2,
            "peak_allocated_gib": 5.8,
        }
    )
    grid = loop_result | gpu | {"job": "grid", "label": "rows x tokens", "section": "grid"}
    budget = (
        loop_result
        | gpu
        | {
            "job": "budgets",
            "label": "emulated cards",
            "section": "budgets",
            "budget": {"budget_gib": 6.0, "cuda_context_gib": 0.5, "start_rows": 9, "start_fit": False},
        }
    )
    suite = {
        "name": "test",
        "command": "python benchmarks/run_all.py",
        "date_utc": common.now_utc(),
        "gpu": "NVIDIA H200",
        "versions": common.versions(),
        "preset": "tutorial",
        "quick": False,
        "wall_s": 1.0,
        "results": [ours, sft, grid, budget],
        "failed": [],
        "skipped": [{"job": "fp16", "reason": "test"}],
    }
    suite["comparison"] = run_all.comparison(suite["results"])
    return suite


def test_suite_tables_render_from_results(loop_result):
    """run_all's Markdown and summary table from results shaped like the H200's."""
    suite = fake_gpu_suite(loop_result)
    assert suite["comparison"]["ours"]["tokens_per_s_ratio"] == pytest.approx(2.0, rel=0.01)
    assert suite["comparison"]["ours"]["peak_allocated_ratio"] == pytest.approx(0.5)
    text = run_all.markdown(suite, "test")
    for heading in (
        "Ours vs TRL SFTTrainer",
        "Rows x tokens per step",
        "Where the memory goes",
        "What fits on a smaller card",
        "Not measured",
    ):
        assert heading in text
    assert "set_per_process_memory_fraction" in text, "the budget table says the cards are emulated"
    assert "tokens/s x2.00" in text
    assert "x2.00" in run_all.short_table(suite)


def test_plots_are_written(loop_result, tmp_path):
    pytest.importorskip("matplotlib")
    run_all.write_plots(fake_gpu_suite(loop_result), tmp_path, "test")
    assert (tmp_path / "test_sweep.png").stat().st_size > 0
    assert (tmp_path / "test_memory.png").stat().st_size > 0


def test_budget_search_starts_above_a_straight_line_fit():
    results = [
        {
            "section": "grid",
            "pipeline": "yoda_raw",
            "tokens_per_step": t,
            "peak_reserved_gib": 2.0 + 0.001 * t,
            "config": {"fp32_frozen": False, "quant_compute_dtype": "auto"},
        }
        for t in (1024, 4096, 16384)
    ]
    starts = run_all.budget_start_rows(results, [6, 24])
    fits = [(b - run_all.CUDA_CONTEXT_GIB - 2.0) / 0.001 / run_all.BUDGET_TOKENS for b in (6, 24)]
    assert all(start > fit for start, fit in zip(starts, fits, strict=True))
    assert starts[0] < starts[1]


@pytest.mark.parametrize("script", ["bench_loop.py", "bench_sft.py", "run_all.py"])
def test_scripts_explain_themselves(script):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "usage:" in done.stdout


def test_run_all_lists_the_suite():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--out", "unused", "--list"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    jobs = [line.split()[0] for line in done.stdout.splitlines()]
    assert done.returncode == 0
    assert {
        "ours",
        "sft",
        "grid",
        "budgets",
        "no-checkpointing",
        "bf16-base",
        "adamw-8bit",
        "adamw",
        "fp32",
        "fp16",
    } <= set(jobs)
