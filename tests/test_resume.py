"""Resume exactness: a run stopped at step k and resumed gives the losses of one straight run."""

import pytest
from accelerate.state import AcceleratorState
from conftest import assert_close_up_to_rounding, rounding_tolerance
from safetensors.torch import load_file

from tests.common import losses
from yoda_raw import checkpoint, train

# The tiny set packs into 29 rows: 4 steps an epoch at batch 8 (8, 8, 8, 5 rows); 2 epochs = 8 steps.
STEPS_PER_EPOCH = 4


# On top of the tiny preset (the tiny_config fixture), what makes a resume hard to get right:
# shuffled rows (a new order each epoch), LoRA dropout (random masks every step), the 4-bit base
# and the 8-bit optimizer (state to save and restore).
RESUME_OPTIONS = {
    "precision": "fp32",
    "epochs": 2,
    "eval_fraction": 0.0,
    "lora_dropout": 0.1,
    "lr": 3e-3,
    "logging_steps": 1,
    "save_steps": 2,
    "auto_batch_size": False,
    "samples": False,
}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_config):
    """One uninterrupted run of 8 steps, checkpointing every 2."""
    out = tmp_path_factory.mktemp("straight")
    AcceleratorState._reset_state(True)
    train.main(tiny_config(RESUME_OPTIONS, output_dir=str(out)))
    AcceleratorState._reset_state(True)
    return out


# The epoch boundary in the default tier; the two mid-epoch resumes (a quarter of a minute each on 2
# cores) in the slow tier.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(
    "k",
    [pytest.param(2, marks=SLOW), STEPS_PER_EPOCH, pytest.param(6, marks=SLOW)],
    ids=["mid-epoch-1", "epoch-boundary", "mid-epoch-2"],
)
def test_resumed_run_equals_straight_run(k, straight, tmp_path, tiny_config):
    """Resumed from checkpoint-k into a fresh output folder: the same loss at every later step and the
    same final adapter as the straight run. Catches a resume that restarts the epoch (rows seen
    twice), reshuffles it, replays the learning-rate schedule from 0, loses the optimizer's moments,
    or restores random states that make dropout draw other masks than the straight run did."""
    expected = losses(straight)
    assert sorted(expected) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    out = tmp_path / "resumed"
    train.main(tiny_config(RESUME_OPTIONS, output_dir=str(out), resume=str(straight / f"checkpoint-{k}")))
    resumed = losses(out)
    assert sorted(resumed) == list(range(k + 1, 2 * STEPS_PER_EPOCH + 1))
    # The same steps on the same CPU from a state saved exactly: within fp32 rounding of the tiny
    # model's step (conftest: 7.2e-5 of the loss); replayed rows, a restarted schedule or lost
    # moments change the losses by percents.
    delta = max(abs(resumed[step] - expected[step]) for step in resumed)
    assert delta <= rounding_tolerance(max(expected.values())), {
        step: (resumed[step], expected[step]) for step in resumed
    }
    final, straight_final = load_file(out / checkpoint.ADAPTER_FILE), load_file(straight / checkpoint.ADAPTER_FILE)
    assert final.keys() == straight_final.keys()
    for name in final:
        assert_close_up_to_rounding(final[name], straight_final[name], name=name)
