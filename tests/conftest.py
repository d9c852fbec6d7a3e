"""Shared test set-up: offline mirror, and isolated Prefect, MLflow and tiktoken state."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("GPTFLOW_MIRROR") or ROOT.parent / "shared" / "data" / "mirror")

# huggingface_hub reads its cache location when first imported, which test modules do while
# they are collected, before any fixture runs: so the private cache is set here.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="gptflow-test-hf-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _offline_environment(tmp_path_factory):
    """Every test reads inputs from the mirror and writes state only under a temp folder."""
    home = tmp_path_factory.mktemp("state")
    saved = dict(os.environ)
    os.environ["GPTFLOW_MIRROR"] = str(MIRROR)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(home / "tiktoken"))
    os.environ["PREFECT_HOME"] = str(home / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    # Prefect binds its console log handlers to sys.stderr when prefect.main is first imported.
    # gptflow imports it lazily, so the first test to need it would bind that test's captured
    # stream, closed once the test ends, and every later Prefect log line would fail (a recursion
    # of logging errors): import it here, on the session's stream.
    import prefect.main  # noqa: F401  (this import sets up Prefect's logging)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not MIRROR.is_dir():
        pytest.skip(f"offline mirror not found at {MIRROR}")
    return MIRROR


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> Path:
    """A private MLflow backend and artifact store; returns the mlflow.yaml to pass to a profile."""
    from tests.tracking import private_tracking

    uri, config = private_tracking(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return config


@pytest.fixture
def run_cli(capsys):
    """Runs one in-process `gptflow` call; returns its exit code, stdout and stderr."""
    from flows.cli import main

    def run(*argv):
        code = 0
        try:
            main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, mirror) -> Path:
    """the-verdict as token shards: two for training, so an epoch crosses a shard boundary, one for validation."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpt_core.tokenizer import get_tokenizer
    ids = np.array(get_tokenizer().encode_ordinary((mirror / "the-verdict.txt").read_text()), dtype=np.uint16)
    folder = tmp_path_factory.mktemp("shards")
    split = int(len(ids) * 0.9)
    pq.write_table(pa.table({"token": ids[:split // 2]}), folder / "train-00000.parquet")
    pq.write_table(pa.table({"token": ids[split // 2:split]}), folder / "train-00001.parquet")
    pq.write_table(pa.table({"token": ids[split:]}), folder / "val-00000.parquet")
    return folder
