"""One precision decision per device (faked CUDA capabilities: no GPU needed)."""

import pytest
import torch

from yoda_raw.errors import YodaError
from yoda_raw.precision import choose_precision

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((9, 0), "bf16"), ((8, 0), "bf16"), ((8, 9), "bf16"), ((7, 5), "fp32"), ((6, 1), "fp32")],
)
def test_auto_picks_bf16_only_with_native_support(monkeypatch, capability, expected):
    """A T4 (7.5) reports is_bf16_supported() True through emulation; auto must still pick fp32."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    precision = choose_precision("auto", CUDA)
    assert precision.name == expected
    assert precision.dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[expected]
    assert precision.mixed_precision == {"bf16": "bf16", "fp32": "no"}[expected]


def test_auto_on_cpu_is_fp32():
    assert choose_precision("auto", torch.device("cpu")).mixed_precision == "no"


def test_explicit_choices_set_dtype_and_accelerate_together():
    fp16 = choose_precision("fp16", CUDA)
    assert (fp16.dtype, fp16.mixed_precision) == (torch.float16, "fp16")
    bf16 = choose_precision("bf16", torch.device("cpu"))
    assert (bf16.dtype, bf16.mixed_precision) == (torch.bfloat16, "bf16")


def test_fp16_on_cpu_is_refused():
    with pytest.raises(YodaError, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16", torch.device("cpu"))
