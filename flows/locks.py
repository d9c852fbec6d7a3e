"""File locks that let two gptflow processes share one working folder.

A stage's output is produced by one process at a time: a second one waits, saying who holds the
lock, and then finds the first one's manifest. MLflow's sqlite database is created (its schema
migrated) by one process at a time, since two creating it at once leave it unusable.
"""

import logging
import os
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("gptflow")


@contextmanager
def exclusive(path: Path, waiting: str):
    """Hold the lock file `path` (created with its folder); while another process holds it, log
    `waiting` once, with that process's pid, and wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, owner = FileLock(path), path.with_name(path.name + ".pid")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = owner.read_text().strip() if owner.is_file() else "?"
        log.warning("%s, being produced by pid %s", waiting, holder)
        lock.acquire()
    try:
        owner.write_text(str(os.getpid()))
        yield
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def stage_lock(folder: Path, stage: str, key: str):
    """The lock on one stage output; it lies beside the output folder, which --force moves aside."""
    return exclusive(folder.with_name(folder.name + ".lock"), f"waiting for {stage} {key[:8]}")


def database_lock(database: Path):
    """The lock on a sqlite database's first-time creation."""
    return exclusive(database.with_name(database.name + ".lock"), f"waiting for the MLflow database {database}")
