"""Data-parallel training across processes started by torchrun or by `launcher.run_group`.

Both set RANK, LOCAL_RANK and WORLD_SIZE for every process they start; `join_group` turns
them into a process group (nccl between GPUs, gloo between CPU processes; met through torchrun's
store or the launcher's file) and the device this process trains on. The training loop asks
`current_group()` and behaves the same for one process or many.
"""

import os
import typing
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

# torch.distributed.nn.functional binds the default group into ten functions' default arguments
# when it is first imported, and DDP imports it lazily. Imported after join_group it would hold the
# group for good: destroy_process_group could not free it, and gloo's three threads would still be
# running while the rank exits (measured on torch 2.13). So it is imported here, before any group.
if dist.is_available():
    import torch.distributed.nn  # noqa: F401

from .errors import GptflowError
from .launcher import STORE_ENV

Device = Literal["auto", "cpu", "cuda"]
DEVICES = typing.get_args(Device)
Backend = Literal["auto", "nccl", "gloo"]


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_group() -> Group:
    if not (dist.is_available() and dist.is_initialized()):
        return Group()
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' is this process's GPU when there is one, else the CPU."""
    if requested not in DEVICES:
        raise GptflowError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise GptflowError("device 'cuda' was asked for but no CUDA GPU is visible; use device auto or cpu")
    if requested != "cpu" and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise GptflowError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                               "lower nproc_per_node")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def join_group(requested_device: str = "auto", backend: str = "auto") -> tuple[Group, torch.device]:
    """Join the process group the environment describes; a lone process stays alone."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Group(), pick_device(requested_device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # The launcher's ranks meet through a file, so no rendezvous port is opened.
        store = os.environ.get(STORE_ENV)
        location = dict(init_method=f"file://{store}", rank=int(os.environ["RANK"]),
                        world_size=int(os.environ["WORLD_SIZE"])) if store else {}
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None, **location)
    return current_group(), device


def leave_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def sum_across(values: list[float], device) -> list[float]:
    """Element-wise sums over all ranks (the values themselves in a lone process)."""
    if current_group().world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    group = current_group()
    if group.world_size == 1:
        return [value]
    gathered = [None] * group.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier():
    if current_group().world_size > 1:
        dist.barrier()
