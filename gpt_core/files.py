"""File helpers every writer shares: content hashes and all-or-nothing writes."""

import hashlib
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_output(path: str | Path):
    """A temporary path beside `path`, synced and renamed onto it only if the block succeeds,
    so readers (and a process restarted after a crash) never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part-{secrets.token_hex(4)}")
    try:
        yield tmp
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
