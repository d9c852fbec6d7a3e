"""File locks that let two gptflow processes share one working folder.

A stage's output is produced by one process at a time: a second one waits, saying who holds the
lock, and then finds the first one's manifest. MLflow's sqlite database is created (its schema
migrated) by one process at a time, since two creating it at once leave it unusable.
"""

import hashlib
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("gptflow")


@contextmanager
def exclusive(path: Path, waiting: str):
    """Hold the lock file `path` (created with its folder); while another process holds it, log
    `waiting` once, with that process's pid, and wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mode 0o666: another user's gptflow on the same folder must be able to open the lock too.
    lock, owner = FileLock(path, mode=0o666), path.with_name(path.name + ".pid")
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
    """The lock on one stage output. It lives in the system's temporary folder, named by the output's
    path, so a stage that fails before any work leaves nothing in the data folder; that makes it a
    lock between processes of one machine (as sqlite's own locking is)."""
    name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    return exclusive(Path(tempfile.gettempdir()) / "gptflow-locks" / f"{name}.lock", f"waiting for {stage} {key[:8]}")


def database_lock(database: Path):
    """The lock on a sqlite database's first-time creation."""
    return exclusive(database.with_name(database.name + ".lock"), f"waiting for the MLflow database {database}")
