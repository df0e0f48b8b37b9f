"""Where the whole run's wall time goes, the launcher's start and the process's exit included.

    python benchmarks/lab/whole_run_split.py --out DIR [run.py options]        # e.g. --init pretrained --model CKPT
    python benchmarks/lab/whole_run_split.py --out DIR --preset tiny --max-steps 2   # a CPU smoke run

Runs the whole training run as the README gives it, `accelerate launch run.py ...`, and stamps every
line it prints with the wall clock as the line arrives. run.py's last line gives its own time from
its first import (`time: N s: ...`), so the stamps split the run's wall time three ways: before
run.py's first import (Python's start, and the launcher's own process with its imports), run.py
itself (its time line), and after its last line (the exit: freeing the GPU, the compile workers
shutting down). It also gives each run's time from the model's load to the saved adapter (run.py's
loading, training and saving; its loading includes the tokenizer and data). Four runs, one after
the other (`--runs` picks some of them):

    launched        accelerate launch run.py, torch's compile cache empty (a first run)
    launched-again  the same, the cache now warm (every later run)
    python          python run.py, no launcher, the cache warm
    compile-pool    the first again, a new empty cache, with inductor's own pool of compile workers
                    (TORCHINDUCTOR_COMPILE_THREADS at its default, the CPU count up to 32); yoda_raw
                    compiles in the process itself unless that variable is set (yoda_raw/model.py)

With --sft "--model CHECKPOINT", then SFTTrainer's whole run (`bench_sft.py --whole-run` with those
options: the tutorial's SFTConfig), timed too: its wall time, and its own time from the
model's load to the saved adapter (after its imports, tokenizer and data).

Writes DIR/split.json, DIR/split.md and each run's stamped output as DIR/NAME.log.
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: yoda_raw and benchmarks/

from benchmarks import common  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]  # `accelerate launch`
PYTHON = [sys.executable]
RUNS = ["launched", "launched-again", "python", "compile-pool"]


def timed_run(name: str, command: list[str], env: dict, out: Path) -> dict:
    """Run `command`, stamping its output lines into out/NAME.log; split its wall time."""
    started = time.time()
    time_line, printed_at = None, None
    with (
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as run,
        open(out / f"{name}.log", "w") as log,
    ):
        for line in run.stdout:  # universal newlines: each progress bar redraw (\r) is a line too
            now = time.time()
            log.write(f"{now - started:8.2f} {line.rstrip()}\n")
            if line.startswith("time: "):
                time_line, printed_at = line.strip(), now
    ended = time.time()
    if run.returncode != 0 or time_line is None:
        common.fail(f"{name}: the run failed (exit status {run.returncode}); its output is in {out / name}.log")
    run_py_s = float(re.match(r"time: (\d+) s:", time_line)[1])
    stages = {stage: float(s) for s, stage in re.findall(r"(\d+) s (loading|training|saving)", time_line)}
    return {
        "name": name,
        "command": " ".join(command),
        "wall_s": round(ended - started, 2),
        "before_run_py_s": round(printed_at - started - run_py_s, 2),  # +-0.5 s: run.py rounds its total
        "run_py_s": run_py_s,
        "after_last_line_s": round(ended - printed_at, 2),
        "model_to_adapter_s": sum(stages.values()),  # +-1.5 s: each stage is rounded
        "time_line": time_line,
    }


def timed_sft(options: list[str], env: dict, out: Path) -> dict:
    """SFTTrainer's whole run (bench_sft.py --whole-run with `options`): wall time, and bench_sft.py's
    own wall_s (the model's load to the saved adapter)."""
    command = [sys.executable, "benchmarks/bench_sft.py", "--whole-run", *options]
    command += ["--name", "sft-whole-run", "--json", str(out / "sft.jsonl")]
    started = time.time()
    with open(out / "sft.log", "w") as log:
        status = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall_s = round(time.time() - started, 2)
    if status != 0:
        common.fail(f"sft: the run failed (exit status {status}); its output is in {out / 'sft.log'}")
    model_to_adapter_s = json.loads((out / "sft.jsonl").read_text().splitlines()[-1])["wall_s"]
    return {"name": "sft", "command": " ".join(command), "wall_s": wall_s, "model_to_adapter_s": model_to_adapter_s}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="whole_run_split.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Folder for split.json, split.md and the runs' logs.")
    parser.add_argument(
        "--runs", default=",".join(RUNS), help=f"Which of the runs, in order (default {','.join(RUNS)})."
    )
    parser.add_argument("--sft", help="Then SFTTrainer's whole run too, with these bench_sft.py options.")
    args, run_options = parser.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_py = ["run.py", *run_options, "--output-dir", tempfile.mkdtemp(prefix="whole_run_"), "--overwrite"]
    # Line by line as they come, and the same compile cache for the first three runs.
    env = os.environ | {"PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor_")}
    pool = env | {
        "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor_"),
        "TORCHINDUCTOR_COMPILE_THREADS": str(min(32, os.cpu_count())),  # inductor's default
    }
    commands = {
        "launched": (LAUNCH + run_py, env),
        "launched-again": (LAUNCH + run_py, env),
        "python": (PYTHON + run_py, env),
        "compile-pool": (LAUNCH + run_py, pool),
    }
    chosen = args.runs.split(",")
    if not set(chosen) <= set(RUNS):
        common.fail(f"--runs {args.runs}: choose from {','.join(RUNS)}")
    runs = [timed_run(name, *commands[name], out) for name in chosen]
    sft = timed_sft(shlex.split(args.sft), env, out) if args.sft else None
    result = {"runs": runs, "sft": sft, "device": common.device_name(), "versions": common.versions()}
    result["date"] = common.now_utc()
    result["command"] = "python benchmarks/lab/whole_run_split.py " + shlex.join(argv)
    (out / "split.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Where the whole run's time goes: {result['device']}",
        "",
        f"`{result['command']}` ({result['date']})",
        "",
        "| run | wall (s) | before run.py (s) | run.py (s) | after its last line (s) | model load to saved "
        "adapter (s) | run.py's time line |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['name']} | {r['wall_s']:.1f} | {r['before_run_py_s']:.1f} | {r['run_py_s']:.0f} | "
            f"{r['after_last_line_s']:.1f} | {r['model_to_adapter_s']:.0f} | `{r['time_line']}` |"
        )
    if sft:
        lines.append(f"| SFTTrainer | {sft['wall_s']:.1f} | | | | {sft['model_to_adapter_s']:.0f} | |")
    (out / "split.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
