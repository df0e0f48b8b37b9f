"""Measuring: the memory breakdown counted tensor by tensor (on CPU tensors, which count the same
way as CUDA ones), the NVML peak sampler, MFU in the loop's own records, and where a run's wall time
went."""

import re
import sys
import threading
import types

import pytest
import torch
from bitsandbytes.nn import Linear4bit

from tests.common import metrics
from yoda_raw import meter
from yoda_raw.config import PRESETS, Config
from yoda_raw.model import parameter_counts
from yoda_raw.optim import build_optimizer

CPU = torch.device("cpu")


@pytest.fixture
def qlora_model(tiny_qlora):
    """The tiny preset's model as the loop builds it on a CPU: 4-bit NF4 base + fp32 LoRA."""
    return tiny_qlora(gradient_checkpointing=False)


def test_count_model_splits_a_4bit_lora_model(qlora_model):
    """Hand-counted: a 4-bit weight is half a byte, LoRA is fp32, everything else is counted
    once. Catches a 4-bit weight counted as frozen fp32, LoRA counted as frozen, tied or shared
    storage counted twice, or a part left out."""
    parts = meter.count_model(qlora_model, "cpu")
    layers = [m for m in qlora_model.modules() if isinstance(m, Linear4bit)]
    assert layers
    assert parts["weights_4bit"] == sum(m.in_features * m.out_features for m in layers) // 2
    trainable, _ = parameter_counts(qlora_model)
    assert parts["lora_params"] == trainable * 4
    assert parts["quant_state"] > 0
    storages = {}  # every distinct storage the model holds, by address
    tensors = [*qlora_model.parameters(), *qlora_model.buffers()]
    tensors += [t for p in qlora_model.parameters() for t in meter.quant_state_tensors(getattr(p, "quant_state", None))]
    for t in tensors:
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    assert sum(parts.values()) == sum(storages.values())
    assert meter.count_model(qlora_model, "cuda") == dict.fromkeys(parts, 0), "nothing on a GPU here"


def test_count_optimizer_after_one_step():
    """torch's AdamW keeps two fp32 moments and a step counter a parameter; paged tensors (bitsandbytes
    marks them `is_paged`) go to their own part. Catches paged state counted as device memory."""
    weight = torch.nn.Parameter(torch.randn(64, 32))
    optimizer = build_optimizer([weight], "adamw", 1e-3, 0.0, CPU)
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    assert meter.count_optimizer(optimizer, "cpu") == {
        "optimizer_state": 2 * 64 * 32 * 4 + 4,
        "optimizer_state_paged": 0,
    }
    paged = torch.zeros(1000, dtype=torch.uint8)
    paged.is_paged = True
    fake = types.SimpleNamespace(state={weight: {"state1": paged, "state2": torch.zeros(10)}})
    assert meter.count_optimizer(fake, "cpu") == {"optimizer_state": 40, "optimizer_state_paged": 1000}


def test_memory_breakdown_on_cpu_counts_the_parts(qlora_model):
    optimizer = build_optimizer([p for p in qlora_model.parameters() if p.requires_grad], "adamw", 1e-3, 0.0, CPU)
    b = meter.memory_breakdown(qlora_model, optimizer, None, {}, CPU)
    assert b["lora_grads_gib"] == b["lora_params_gib"] > 0
    assert b["optimizer_state_gib"] == 0, "no state before the first step"
    assert "activations_at_peak_gib" not in b and "torch's memory counters are CUDA's" in b["note"]


H200_BREAKDOWN = {  # benchmarks/results/h200: ours at 16 x 64
    "weights_4bit_gib": 1.741,
    "weights_other_gib": 0.367,
    "lora_params_gib": 0.047,
    "lora_grads_gib": 0.047,
    "optimizer_state_gib": 0.016,
    "optimizer_state_paged_gib": 0.008,
    "activations_at_peak_gib": 0.592,
    "allocator_beyond_allocated_gib": 0.391,
    "peak_reserved_gib": 3.201,
    "device_used_gib": 4.676,
    "outside_torch_gib": 1.475,
    "tolerance_gib": 0.1,
    "adds_up": True,
}


def test_format_breakdown_names_every_part():
    text = meter.format_breakdown(H200_BREAKDOWN | {"earlier_work_gib": 0.25})
    for _, label, _ in meter.BREAKDOWN_PARTS:
        assert label in text
    # What an earlier run left shows only where there is some: a run alone never has it.
    earlier = next(label for key, label, _ in meter.BREAKDOWN_PARTS if key == "earlier_work_gib")
    assert earlier not in meter.format_breakdown(H200_BREAKDOWN | {"earlier_work_gib": 0.0})
    assert "3.201  = peak reserved" in text and "4.676 device used (NVML)" in text
    assert "add up" in text and "NOT" not in text
    assert "do NOT add up within 0.1 GiB" in meter.format_breakdown(H200_BREAKDOWN | {"adds_up": False})


def test_memory_breakdown_counts_what_an_earlier_run_left_apart(monkeypatch):
    """Torch's counters are the process's: tensors an earlier run or a notebook left allocated are in
    every reading. The breakdown counts them as a part of their own, so they neither pass for this
    run's activations nor make the check fail. Torch's CUDA counters are stood in for (the
    arithmetic is the same on any machine): 2 GiB of weights, 0.5 GiB left from before, a peak of
    4 GiB allocated and 5 GiB reserved."""
    gib = meter.GIB
    parts = {"weights_4bit": 2 * gib, "quant_state": 0, "weights_other": 0, "lora_params": 0}
    monkeypatch.setattr(meter, "count_model", lambda model, device_type: dict(parts))
    monkeypatch.setattr(
        meter, "count_optimizer", lambda opt, device_type: {"optimizer_state": 0, "optimizer_state_paged": 0}
    )
    monkeypatch.setattr(meter, "cublas_workspace_bytes", lambda model, opt, device: 0)
    monkeypatch.setattr(meter, "tensor_bytes", lambda tensors, seen, device_type=None: 0)  # no gradients now
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(2.5 * gib))
    model = torch.nn.Linear(1, 1)
    peaks = {"peak_allocated_gib": 4.0, "peak_reserved_gib": 5.0}
    cuda = types.SimpleNamespace(type="cuda")

    b = meter.memory_breakdown(model, None, int(2.5 * gib), peaks, cuda, allocated_before_run=gib // 2)
    assert b["earlier_work_gib"] == 0.5 and b["activations_at_peak_gib"] == 1.5
    assert b["adds_up"] and b["mismatch_after_load_gib"] == 0 and b["mismatch_after_loop_gib"] == 0
    alone = meter.memory_breakdown(model, None, int(2.5 * gib), peaks, cuda)  # as if nothing were left
    assert alone["activations_at_peak_gib"] == 2.0 and not alone["adds_up"]


def test_device_used_peak_sees_what_is_freed_before_the_end():
    """The sampler keeps the highest reading, not the last. No clock in the assertion: the block
    waits until the thread has read the high value."""
    readings = iter([100, 700, 300, 200])
    read_three = threading.Event()
    calls = []

    def read():
        calls.append(1)
        if len(calls) >= 3:
            read_three.set()
        return next(readings, 200)

    with meter.DeviceUsedPeak(read=read, interval_s=0.001) as peak:
        assert read_three.wait(timeout=60)
    assert peak.peak_bytes == 700
    with meter.DeviceUsedPeak(CPU) as nothing:
        pass
    assert nothing.peak_bytes is None, "no NVML for a CPU"


def test_mfu_is_per_device(monkeypatch):
    monkeypatch.setattr(meter, "peak_flops", lambda device: 1e12)
    assert meter.mfu(1000.0, 1e9, CPU) == {"mfu": 1.0}
    assert meter.mfu(1000.0, 1e9, CPU, n_devices=4) == {"mfu": 0.25}


def test_the_loop_logs_mfu_where_the_peak_is_known(monkeypatch, tmp_path):
    """Each record's MFU is that step window's tokens/s x FLOPs a token over the peak. Catches a
    record without MFU, or one computed from the wrong tokens or parameter counts."""
    from yoda_raw import train

    monkeypatch.setattr(meter, "peak_flops", lambda device: 1e12)
    cfg = Config(
        **{
            "preset": "tiny",
            **PRESETS["tiny"],
            "eval_fraction": 0.0,
            "samples": False,
            "logging_steps": 1,
            "max_steps": 2,
            "output_dir": str(tmp_path),
        }
    )
    result = train.main(cfg)
    per_token = meter.flops_per_token(result.total_params - result.trainable_params, result.trainable_params)
    assert len(result.fit.log) == 2
    for record in result.fit.log:
        # mfu is logged to 4 significant digits (within 5e-4 relative) and tokens_per_s to 0.1.
        assert record["mfu"] == pytest.approx(per_token * record["tokens_per_s"] / 1e12, rel=1e-3)


def test_the_run_says_where_its_wall_time_went(tmp_path, tiny_config):
    """A run ends with the wall time of each stage (run.py prints it), and every metrics record
    says how far into the loop it was written (the first one holds the compiling, on the fast path).
    Catches stages that overlap or miss time (their sum against the clock around the run), a
    training time shorter than the loop's own last record, or elapsed times that restart from each
    logging window."""
    import time

    import run
    from yoda_raw import train

    started = time.perf_counter()
    result = train.main(tiny_config(max_steps=3, logging_steps=1, eval_fraction=0.0, output_dir=str(tmp_path)))
    wall = time.perf_counter() - started
    seconds = result.seconds
    assert list(seconds) == ["starting", "loading", "training", "saving"], seconds
    assert all(s > 0 for s in seconds.values()), seconds
    assert wall - 1.0 < sum(seconds.values()) <= wall  # the stages cover the run, once each
    records = metrics(tmp_path)
    elapsed = [r["elapsed_s"] for r in records]
    assert len(elapsed) == 3 and 0 < elapsed[0] < elapsed[1] < elapsed[2] <= seconds["training"] + 0.01, elapsed
    line = run.time_line(result, total_s=wall + 2.0)  # as if importing had taken 2 s before
    pattern = (
        r"time: (\d+) s: (\d+) s importing, \d+ s starting, \d+ s loading, \d+ s training "
        r"\(\d+ s of it to step 1, warm-up included\), \d+ s saving"
    )
    match = re.fullmatch(pattern, line)
    assert match and int(match[1]) == round(wall + 2.0) and 2 <= int(match[2]) <= 3, line


def fake_nvml(reserved: int, allocated: int, has_v2: bool = True) -> types.ModuleType:
    """What meter reads of nvidia-ml-py: memory info in its first version (used = the driver's
    reservation + what processes allocated) and, in nvidia-ml-py's that have it, its second."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = type("NVMLError", (Exception,), {})
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetHandleByIndex = lambda index: index
    v1 = types.SimpleNamespace(used=reserved + allocated)
    v2 = types.SimpleNamespace(used=allocated, reserved=reserved)
    if has_v2:
        nvml.nvmlMemory_v2 = 0x02000028
        nvml.nvmlDeviceGetMemoryInfo = lambda handle, version=None: v1 if version is None else v2
    else:
        nvml.nvmlDeviceGetMemoryInfo = lambda handle: v1
    return nvml


def test_nvml_reads_the_card_and_the_drivers_reservation_apart(monkeypatch):
    """The card's reading counts the driver's reservation (what a card's owner must fit the run
    into); the reservation is read on its own, so a result can tell the two apart. Catches reading
    the second version's `used` for the card, or the reservation from the first version."""
    cuda = torch.device("cuda", 0)  # a device object only: nothing here touches CUDA
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(reserved=500, allocated=3000))
    assert meter.nvml_used_bytes(cuda) == 3500
    assert meter.nvml_reserved_bytes(cuda) == 500
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(reserved=500, allocated=3000, has_v2=False))
    assert meter.nvml_used_bytes(cuda) == 3500
    assert meter.nvml_reserved_bytes(cuda) is None, "no second version: no reservation, and no traceback"
    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed
    assert meter.nvml_used_bytes(cuda) is None and meter.nvml_reserved_bytes(cuda) is None
