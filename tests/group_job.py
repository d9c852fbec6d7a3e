"""A rank of a training group for the launcher tests: joins the group, says it is ready, and
waits for the test's go-ahead (or, as told, fails)."""

import os
import sys
import time
from pathlib import Path

from gpt_core.distributed import barrier, join_group, leave_group

DEADLINE_SECONDS = 120


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
    barrier()
    (folder / f"ready-{rank}").write_text(str(os.getpid()))
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.1)
    barrier()
    leave_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
