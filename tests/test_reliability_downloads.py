"""Faults around writing and fetching files: kills, stalls, permissions, replaced base models.

Each test is bounded to seconds: servers stall on loopback, deadlines are short, models tiny.
"""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gpt_core.config import ModelConfig
from gpt_core.download import fetch_url
from gpt_core.files import atomic_write_bytes, temp_path
from gpt_core.model import GPTModel
from gpt_core.weights import save_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=64, context_length=8, emb_dim=8, n_heads=2, n_layers=1)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_saved_files_are_0644_under_umask_022(umask_022, tmp_path):
    folder = save_model(GPTModel(TINY), tmp_path / "model")
    source = tmp_path / "source.txt"
    source.write_bytes(b"text")
    fetched = fetch_url(source.as_uri(), tmp_path / "raw" / "text.txt", None, progress=False)
    assert {p.name: _mode(p) for p in [*folder.iterdir(), fetched]} == {
        "model.safetensors": 0o644, "config.json": 0o644, "text.txt": 0o644}


def test_a_dead_writers_temp_file_is_swept_at_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    leftover = temp_path(tmp_path / "model.safetensors")
    leftover = leftover.with_name(leftover.name.replace(f"-{os.getpid()}-", f"-{dead}-"))
    leftover.write_bytes(b"half a checkpoint")
    mine = temp_path(tmp_path / "other.bin")  # a live writer's (this process's) is kept
    mine.write_bytes(b"in progress")
    atomic_write_bytes(tmp_path / "config.json", b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.json", mine.name])
