"""What a training process holds on the GPU outside torch's allocator, stage by stage, by NVML.

    python benchmarks/lab/outside_torch.py [run.py options]      # e.g. --batch-size 16 --max-length 512

NVML's "device used" counts everything the process holds on the card: torch's reserved memory, and
beside it the CUDA context, the libraries' workspaces and every kernel module loaded. This reads
NVML and torch's reserved memory after each thing that could load something new, first on its own
(the context; cuBLAS's first matmul; cuBLASLt's FP8 matmul; a Triton kernel; bitsandbytes' 4-bit
matmul), then at each stage of a real run (`train.main` with an observer, yoda_raw/hooks.py), and
prints the part outside torch (used - reserved) and what each stage added to it. One JSON line
per reading goes to --json. CUDA only; the card should be otherwise idle (NVML counts the device).
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.bench_loop import parse_config  # noqa: E402

GIB = common.GIB


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--json", default=None, help="Append one JSON line per reading here.")
    parser.add_argument("--steps", type=int, default=4, help="Training steps to run (default 4).")
    args, rest = parser.parse_known_args(argv)
    import torch

    if not torch.cuda.is_available():
        common.fail("outside_torch.py reads a CUDA GPU's memory")
    from yoda_raw import meter

    device = torch.device("cuda", 0)
    if meter.nvml_reader(device) is None:
        common.fail("outside_torch.py needs NVML: pip install nvidia-ml-py")
    readings = [{"stage": "idle, before CUDA", "used_gib": 0.0, "reserved_gib": 0.0, "outside_gib": 0.0}]
    idle = meter.nvml_used_bytes(device)  # other processes and the driver, before ours starts
    print(f"device used before this process's CUDA context: {idle / GIB:.3f} GiB (subtracted from every reading)")

    def read(stage: str) -> None:
        torch.cuda.synchronize(device)
        used, reserved = meter.nvml_used_bytes(device) - idle, torch.cuda.memory_reserved(device)
        outside = used - reserved
        added = outside - readings[-1]["outside_gib"] * GIB
        readings.append(
            {"stage": stage, "used_gib": used / GIB, "reserved_gib": reserved / GIB, "outside_gib": outside / GIB}
        )
        print(
            f"{stage:<44} used {used / GIB:7.3f}  reserved {reserved / GIB:7.3f}  outside torch "
            f"{outside / GIB:6.3f} GiB ({added / 2**20:+8.1f} MiB)",
            flush=True,
        )

    print(
        "CUDA_MODULE_LOADING =",
        os.environ.get("CUDA_MODULE_LOADING", "(unset: torch sets LAZY)"),
        "CUBLAS_WORKSPACE_CONFIG =",
        os.environ.get("CUBLAS_WORKSPACE_CONFIG", "(unset)"),
    )
    torch.zeros(1, device=device)
    read("CUDA context (torch.zeros)")
    a = torch.randn(1024, 1024, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    read("cuBLAS: a bf16 matmul")
    if torch.cuda.get_device_capability(device) >= (8, 9):
        scale = torch.ones((), device=device)
        torch._scaled_mm(
            a.to(torch.float8_e4m3fn), a.to(torch.float8_e4m3fn).t(), scale, scale, out_dtype=torch.bfloat16
        )
        read("cuBLASLt: an FP8 matmul")
    torch.compile(lambda x: torch.nn.functional.silu(x) * x)(a).sum().item()
    read("Triton: one compiled kernel")
    import bitsandbytes.functional as bnb_f

    q, state = bnb_f.quantize_4bit(a, quant_type="nf4")
    bnb_f.dequantize_4bit(q, state).sum().item()
    read("bitsandbytes: quantize and dequantize")
    del a, q, state
    torch.cuda.empty_cache()
    read("after empty_cache")

    from yoda_raw import train
    from yoda_raw.hooks import Observer

    class Stages(Observer):
        def base_model(self, model):
            read("run: base model loaded (4-bit)")

        def adapted(self, model):
            read("run: LoRA and the fast path's levers on")

        def loop_start(self, *args):
            read("run: optimizer built, accelerator.prepare")

        def updated(self, step, lr, optimizer):
            if step <= 2 or step == args.steps:
                read(f"run: step {step} done")

    cfg = parse_config(rest)
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(
            cfg,
            output_dir=str(Path(out) / "run"),
            max_steps=args.steps,
            logging_steps=args.steps,
            samples=False,
            eval_fraction=0.0,
            save_steps=0,
        )
        train.main(cfg, observer=Stages())
    read("run: returned")
    if args.json:
        with open(args.json, "a") as f:
            for r in readings:
                f.write(json.dumps({"device": common.device_name(), **r}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
