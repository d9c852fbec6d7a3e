"""gpt_core.precision: bf16 detection, autocast choice and the matmul FLOP/s probe."""

import contextlib

import pytest
import torch

from gpt_core import precision
from gpt_core.errors import GptflowError


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU has the given feature flags."""
    def set_flags(*flags):
        monkeypatch.setattr(precision, "_cpu_flags", lambda: set(flags))
    return set_flags


@pytest.mark.parametrize("flags, supported", [
    (("avx512f",), False),
    (("avx512f", "avx512_bf16"), True),
    (("amx_tile", "amx_bf16"), True),
])
def test_cpu_bf16_needs_avx512_bf16_or_amx(cpu_flags, flags, supported):
    cpu_flags(*flags)
    assert precision.bf16_supported("cpu") is supported


def test_auto_follows_support(cpu_flags):
    cpu_flags("amx_bf16")
    assert precision.resolve_precision("cpu", "auto") == "bf16"
    assert precision.resolve_precision("cpu", "fp32") == "fp32"
    with precision.autocast("cpu", "auto"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    cpu_flags()
    assert precision.resolve_precision("cpu", "auto") == "fp32"
    assert isinstance(precision.autocast("cpu", "auto"), contextlib.nullcontext)


def test_forced_bf16_without_support_fails(cpu_flags):
    cpu_flags("avx2")
    with pytest.raises(GptflowError, match="bf16"):
        precision.autocast("cpu", "bf16")


def test_unknown_precision_fails():
    with pytest.raises(GptflowError, match="fp16"):
        precision.resolve_precision("cpu", "fp16")


def test_peak_flops_is_positive():
    assert precision.measure_peak_flops("cpu", "fp32", size=64, seconds=0.01) > 0
