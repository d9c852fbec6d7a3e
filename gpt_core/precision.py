"""Numeric precision: when bf16 autocast pays off, and the peak matmul rate for MFU."""

import contextlib
import sys
import time
import typing
from pathlib import Path
from typing import Literal

import torch

from .errors import GptflowError

Precision = Literal["auto", "bf16", "fp32"]
PRECISIONS = typing.get_args(Precision)


def _cpu_flags() -> set[str]:
    if not sys.platform.startswith("linux"):
        return set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def bf16_supported(device) -> bool:
    """Whether bf16 runs natively; without AVX-512 BF16 or AMX a CPU emulates it, slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(device, precision: str = "auto") -> str:
    """'bf16' or 'fp32' for `precision` ('auto', 'bf16' or 'fp32') on `device`."""
    if precision not in PRECISIONS:
        raise GptflowError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return "fp32"
    if bf16_supported(device):
        return "bf16"
    if precision == "bf16":
        raise GptflowError(f"bf16 is not supported natively on device '{device}'; use precision fp32 or auto")
    return "fp32"


def autocast(device, precision: str = "auto"):
    """A context manager running matmuls in bf16 where resolved so, else doing nothing."""
    if resolve_precision(device, precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


_BEST_PEAK: dict[tuple, float] = {}


def peak_flops(device, precision: str = "auto") -> float:
    """The MFU denominator: the best matmul rate this process has measured for the device and dtype.

    Measured (best of three short runs) when a training run starts, never mid-run, and kept as the
    best so far: a machine busy at the first run's start measures low, which would push a later
    run's MFU above 1, so every run's start can only raise it.
    """
    key = (str(torch.device(device)), resolve_precision(device, precision))
    measured = max(measure_peak_flops(device, precision, seconds=0.3) for _ in range(3))
    _BEST_PEAK[key] = max(measured, _BEST_PEAK.get(key, 0.0))
    return _BEST_PEAK[key]


def measure_peak_flops(device, precision: str = "auto", size: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of square matmuls in the dtype training runs at: the denominator of MFU."""
    device = torch.device(device)
    dtype = torch.bfloat16 if resolve_precision(device, precision) == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm up kernels and caches
        torch.mm(a, b)
    sync()
    # Synchronise only between ever larger batches, so a fast GPU is not timed waiting on the host.
    runs, batch = 0, 1
    start = time.perf_counter()
    while runs == 0 or time.perf_counter() - start < seconds:
        for _ in range(batch):
            torch.mm(a, b)
        sync()
        runs += batch
        batch *= 2
    return 2 * size**3 * runs / (time.perf_counter() - start)
