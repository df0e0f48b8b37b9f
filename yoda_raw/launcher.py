"""Running under `accelerate launch`: what a run says about its processes.

`accelerate launch --cpu --num_processes 2 run.py` runs one process (`--cpu` takes the simple
launcher, which starts one): a run says at start how many it has (train.start_lines), and on a CPU
with one process under `--cpu` how to get several, so that nobody waits for a speed-up that is not
there. With several processes every one of them meets the same bad option or folder; the main
process alone prints the error line (yoda_raw/cli.py), once.
"""

from accelerate.utils import parse_flag_from_env


def one_process_hint(num_processes: int, device) -> str:
    """'' or, for one process on a CPU under `accelerate launch --cpu`, how to start several."""
    if num_processes == 1 and device.type == "cpu" and parse_flag_from_env("ACCELERATE_USE_CPU"):
        return (
            " (`accelerate launch --cpu` starts one whatever --num_processes says; for several on a CPU: "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N run.py)"
        )
    return ""
