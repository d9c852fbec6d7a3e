"""File helpers every writer shares: content hashes and all-or-nothing writes."""

import hashlib
import json
import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path

TEMP_MARK = ".part-"
# A temp file nobody has written to for this long belongs to a writer that is gone (on another
# host too, where its process id cannot be checked).
STALE_AFTER_S = 600
_swept: set[Path] = set()  # folders this process has swept: leftovers predate it


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def temp_path(path: Path) -> Path:
    """A hidden name beside `path` that says whose it is: `.NAME.part-HOST-PID-RANDOM`."""
    return path.with_name(f".{path.name}{TEMP_MARK}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _writer_gone(host: str, pid: str) -> bool:
    if host != _host() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by someone else
        return False
    return False


def sweep_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temp files of writers that were killed: their process is gone, or nothing has
    written to them for STALE_AFTER_S. Returns what was deleted."""
    removed = []
    try:
        entries = list(Path(folder).glob(f".*{TEMP_MARK}*"))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        owner = entry.name.rpartition(TEMP_MARK)[2].split("-")
        try:
            stale = now - entry.stat().st_mtime > STALE_AFTER_S
            if stale or (len(owner) == 3 and _writer_gone(owner[0], owner[1])):
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # another process swept it first
            pass
    return removed


@contextmanager
def atomic_output(path: str | Path):
    """A temporary path beside `path`, synced and renamed onto it only if the block succeeds,
    so readers (and a process restarted after a crash) never see half a file.

    The result gets mode 0666 less the umask (0644 under umask 022), as readable as any file the
    user creates, whatever library fills it; stale temp files of killed writers in the same
    folder are swept first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _swept:
        sweep_temp_files(path.parent)
        _swept.add(path.parent)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode
    os.close(fd)
    try:
        yield tmp
        # Some writers (safetensors) replace the file with their own 0600 one: put the mode back.
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes):
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | Path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
