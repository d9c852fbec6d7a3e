"""A rank of a training group for the launcher tests: joins the group, says it is ready, and
waits for the test's go-ahead (or, as told, fails); or, told `ddp`, takes a DDP step, leaves the
group and writes down the threads still running in it."""

import os
import sys
import time
from pathlib import Path

import torch

from gpt_core.distributed import barrier, join_group, leave_group

DEADLINE_SECONDS = 120
THREAD_EXIT_SECONDS = 30  # well under the test's wait for the group, so a failure reads as one


def main(folder: str, behaviour: str) -> int:
    folder = Path(folder)
    rank = int(os.environ["RANK"])
    attempts = folder / f"attempts-{rank}"
    attempts.write_text(attempts.read_text() + "x" if attempts.exists() else "x")
    if behaviour == "fail-first" and rank == 1 and attempts.read_text() == "x":
        return 1
    if behaviour == "user-error" and rank == 1:
        return 2
    join_group("cpu", "gloo")
    if behaviour == "ddp":
        ddp_step()
        leave_group()
        # A joined thread can stay listed in /proc for a moment on a busy machine.
        until(lambda: not any("gloo" in name for name in thread_names()), THREAD_EXIT_SECONDS)
        (folder / f"threads-{rank}").write_text("\n".join(thread_names()))
        return 0
    barrier()
    (folder / f"ready-{rank}").write_text(str(os.getpid()))
    if not until((folder / "go").exists, DEADLINE_SECONDS):
        return 3
    barrier()
    leave_group()
    return 0


def until(condition, seconds: float) -> bool:
    """Whether `condition()` came true within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def thread_names() -> list[str]:
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:  # it ended since the listing
            continue
    return sorted(names)


def ddp_step():
    """One backward pass through a DDP-wrapped model, as a training loop takes it."""
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.ones(2, 4)).sum().backward()


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
