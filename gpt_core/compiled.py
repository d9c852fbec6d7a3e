"""torch.compile for training and decoding: whether it pays, where its code is kept, what it cost.

`compile: true` compiles, `false` runs eager, `auto` compiles where it pays back: on a device
inductor can compile for, and only for a run whose eager duration, estimated from its FLOPs and
the measured matmul peak, is long enough to repay compiling. Compilation on the team's 2-core CPU
took 97 s cold for gpt2-small and bought 1.3x on the step, so it pays after roughly 430 s of
eager training; AUTO_MIN_EAGER_SECONDS asks for twice that. (On the same machine's AMX hardware
of 2026-12-07: 20-35 s, 1.1-1.2x in bf16, nothing in fp32.) Inductor keeps what it compiled
under TORCHINDUCTOR_CACHE_DIR (the stages point it at the data folder), and a second run of the
same model and shapes, in any process, compiles in a fraction of the time.

Decoding compiles its single-token step (gpt_core.generate); there `auto` means CUDA only.
"""

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

Compile = bool | Literal["auto"]
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
AUTO_MIN_EAGER_SECONDS = 900.0
# What eager training reaches of the matmul peak (`gptflow bench train` measures it): 0.6 of a bf16
# peak without AMX, 0.27 with it, 0.8-0.95 of fp32's. A middle figure; too high only compiles less.
ASSUMED_EAGER_MFU = 0.5
SLOWEST_PEAK = 1e9  # FLOP/s: below any device worth compiling for


def can_compile(device) -> bool:
    """Whether inductor has a compiler for `device`: Triton for CUDA, a C++ compiler for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return has_triton()
    if device.type == "cpu":
        return any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    return False


def should_compile(setting: Compile, device, work_flops: float = 0.0,
                   peak: Callable[[], float] | None = None) -> bool:
    """The decision for `setting` on `device`. `auto` weighs the run's remaining FLOPs against the
    device's matmul rate, `peak()`, measured only when the run is not plainly short."""
    if setting is True or setting is False:
        return setting
    if not can_compile(device) or peak is None:
        return False
    threshold = AUTO_MIN_EAGER_SECONDS * ASSUMED_EAGER_MFU
    if work_flops < threshold * SLOWEST_PEAK:
        return False  # short on any device
    return work_flops / peak() >= threshold


def should_compile_decoding(setting: Compile, device) -> bool:
    """The decision for `setting` when decoding on `device`. `auto` compiles on CUDA, where a
    decode step of a model this size waits on launching its many small kernels, which compiling
    fuses; not on the CPU, where the compiled step ran at 0.4x of eager decoding with bf16 packed
    weights (`gptflow bench generate`, two runs)."""
    if setting is True or setting is False:
        return setting
    return torch.device(device).type == "cuda" and can_compile(device)


def compile_seconds() -> float:
    """Wall seconds this process has spent compiling so far (graph capture, inductor, autotuning)."""
    from torch._dynamo.utils import calculate_time_spent
    return float(calculate_time_spent().get("total_wall_time", 0.0))


def keep_compiled_code_in(folder: Path):
    """Inductor's caches under `folder`, unless the user already chose a place."""
    os.environ.setdefault(CACHE_ENV, str(folder))
