"""Shared fixtures: the real Phi-3 tokenizer and yoda rows (when present), the tiny tokenizer.

The real files are never copied into the project. They are found through the YODA_RAW_DATA
environment variable (a folder holding phi3-mini-4k-instruct/ and yoda_sentences/), or else
../shared/data next to the repository; tests that need them skip, saying why, when neither exists.
"""

import os

# Tests never download: with the Hub in offline mode a stray Hub id fails at once instead of
# retrying for half a minute. Set before transformers and datasets are imported (they read it then).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    return Path(os.environ.get("YODA_RAW_DATA") or REPO_ROOT.parent / "shared" / "data")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: set YODA_RAW_DATA to the folder holding the Phi-3 tokenizer and yoda data")
    return path


@pytest.fixture(scope="session")
def phi3_path() -> Path:
    """Folder of the real Phi-3-mini-4k-instruct tokenizer files."""
    return _need(data_dir() / "phi3-mini-4k-instruct")


@pytest.fixture(scope="session")
def phi3_tokenizer(phi3_path):
    """The real Phi-3 tokenizer, loaded as run.py loads it (pad = unk). Takes ~2.5 s, once."""
    from yoda_raw.chat import load_tokenizer

    return load_tokenizer(str(phi3_path))


@pytest.fixture(scope="session")
def yoda_rows_path() -> Path:
    """The 720-row yoda_sentences.jsonl (sentence, translation, translation_extra)."""
    return _need(data_dir() / "yoda_sentences" / "yoda_sentences.jsonl")


@pytest.fixture(scope="session")
def yoda_conversations(yoda_rows_path):
    from yoda_raw.data import load_conversations

    return load_conversations(str(yoda_rows_path))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """yoda_raw's tiny tokenizer, loaded as run.py loads it for --preset tiny (pad = unk)."""
    from yoda_raw.chat import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """A tiny random-init Phi-3-architecture model (fp32, CPU), fresh for each test."""
    import torch
    import transformers

    from yoda_raw import tiny

    transformers.set_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny.model_config(len(tiny_tokenizer)), dtype=torch.float32)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never write the user's cache (~/.cache/yoda_raw): a run on a local base folder
    remembers its sha256 there (identity.py). They get a cache of their own, which links to the
    models the user's holds (the smol preset's, fetched once); commands they start inherit it."""
    from yoda_raw.fetch import cache_dir

    user_cache, private = cache_dir(), tmp_path_factory.mktemp("yoda_raw_cache")
    for folder in user_cache.iterdir() if user_cache.is_dir() else []:
        if folder.is_dir() and not folder.name.startswith("."):
            (private / folder.name).symlink_to(folder.resolve(), target_is_directory=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("YODA_RAW_CACHE", str(private))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """AcceleratorState is a per-process singleton: reset it so each test builds its own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


@pytest.fixture(scope="session")
def tiny_config():
    """Make a Config of the tiny preset as `run.py --preset tiny` resolves it, then `options` (a
    test module's own choices, as a dict) and keyword overrides on top, later winning:
    `tiny_config(RESUME_OPTIONS, output_dir=str(tmp_path), resume=...)`."""
    from yoda_raw.config import PRESETS, Config

    def make(options: dict | None = None, /, **overrides) -> Config:
        return Config(**{"preset": "tiny", **PRESETS["tiny"], **(options or {}), **overrides})

    return make


@pytest.fixture(scope="session")
def tiny_qlora(tiny_tokenizer, tiny_config):
    """Build the tiny preset's model as the loop builds it on a CPU (4-bit NF4 base, fp32 LoRA,
    checkpointing), Config overrides on top: `tiny_qlora(lora_dropout=0.1)`."""
    import torch

    from yoda_raw.model import add_lora, load_base_model
    from yoda_raw.precision import choose_precision

    cpu = torch.device("cpu")

    def make(**overrides):
        cfg = tiny_config(quant="nf4", **overrides)
        model = load_base_model(cfg, choose_precision("fp32", cpu), cpu, vocab_size=len(tiny_tokenizer))
        return add_lora(model, cfg)

    return make


# --- how close two correct fp32 computations of the same numbers are ------------------------------
# Kernels add in different orders on different CPUs: torch picks AVX-512, AVX2 or plain loops at
# start (ATEN_CPU_CAPABILITY), oneDNN and MKL block a matmul by the cache they find, and a padded or
# regrouped batch changes the shapes and so the blocking. Each addition rounds, by at most u (the
# unit roundoff, 2**-24 in fp32) of its size. Higham and Mary ("A New Approach to Probabilistic
# Rounding Error Analysis", SIAM J. Sci. Comput. 2019) show that n such roundings, independent and
# of mean zero, move a result by more than LAMBDA * sqrt(n) * u of its size with probability below
# 2 exp(-LAMBDA**2 / 2): under 1e-13 for LAMBDA = 8, a bound for any CPU's order, not a wish.
# Comparisons are norm-wise, scaled by the largest |value| of the tensor compared: an element that
# came out near zero by cancellation carries the rounding of the large terms it summed, not of its
# own size (an elementwise rtol fails on it). The largest |value| stands in for the sum of |terms|,
# which a test cannot see; LAMBDA's margin covers the difference.
LAMBDA = 8

# The tiny model's forward and backward, its longest chain of sums: per decoder layer the norm (64),
# qkv (64), scores (16, a head), the softmax and its weighted sum (up to 64 positions), o (64), the
# norm, gate_up (64) and down (256), 9 sums; two layers, the final norm, the LM head (64) and the
# softmax over 512 tokens, 21 in the forward; the backward runs each one again, and its weight
# gradients sum over the batch's (at most 512) positions: 42 sums of at most 512 terms, so a value
# at the end of a step has passed through at most 42 * 512 roundings. Its bound: 7.2e-5 of its size.
TINY_ROUNDINGS = 42 * 512


def rounding_tolerance(magnitude: float, roundings: int = TINY_ROUNDINGS, dtype=None, steps: int = 1) -> float:
    """The most two correct computations of a value of size `magnitude` may differ by when each
    went through `roundings` roundings, in another order: LAMBDA * sqrt(roundings) * u * magnitude,
    u of fp32 unless `dtype` says otherwise. E.g. the tiny model's loss or gradients: 8 * sqrt(21504)
    * 6.0e-8 = 7.2e-5 of their size; one fp32 dot product of 64 terms: 3.8e-6 of its size.

    A loss after `steps` optimizer steps carries each step's rounding: Adam's update m / sqrt(v)
    keeps a gradient's relative error as it is (it divides out the size), so the weights, and the
    next loss, move by that fraction of an update per step, and the bound grows by `steps`."""
    import math

    import torch

    u = torch.finfo(dtype or torch.float32).eps / 2
    return LAMBDA * math.sqrt(roundings) * u * magnitude * steps


def assert_close_up_to_rounding(actual, expected, roundings: int = TINY_ROUNDINGS, name: str = ""):
    """torch.testing.assert_close with the bound of `rounding_tolerance`, scaled by expected's
    largest |value| (all elements share it: see above). A zero tensor must come out exactly zero."""
    import torch

    tolerance = rounding_tolerance(expected.detach().abs().max().item(), roundings, expected.dtype)
    torch.testing.assert_close(
        actual, expected, rtol=0, atol=tolerance, msg=lambda text: f"{name}: {text}\n(bound: {tolerance:.2e})"
    )
