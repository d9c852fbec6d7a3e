"""The tokenize stage as a plain function: download -> tokenize, manifest, cache and MLflow run."""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from flows.download import Config as DownloadConfig
from flows.settings import profile_model
from flows.stage import run_stage
from flows.tokenize import Config as TokenizeConfig
from gpt_core.errors import GptflowError
from gpt_core.shards import read_shard
from tests.tracking import private_tracking

Profile = profile_model()

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("GPTFLOW_MIRROR") or REPO.parent / "shared/data/mirror")
pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no mirror folder at {MIRROR}; set GPTFLOW_MIRROR")


@pytest.fixture
def profile(tmp_path, monkeypatch):
    uri, config = private_tracking(tmp_path)
    monkeypatch.setenv("GPTFLOW_MIRROR", str(MIRROR))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    return Profile(data_dir=tmp_path / "data", mlflow_config=config,
                   download=DownloadConfig(sources=["the-verdict", "sms-spam", "instruction-data"]),
                   tokenize=TokenizeConfig(corpora=["the-verdict"], shard_tokens=1000))


def test_download_then_tokenize(profile):
    download = run_stage("download", profile)
    manifest = run_stage("tokenize", profile, {"download": download})
    assert manifest["cached"] is False and manifest["stage"] == "tokenize"
    assert manifest["upstream"]["download"]["key"] == download["key"]

    outputs = manifest["outputs"]
    pretrain = outputs["pretrain"]
    assert pretrain["train"]["tokens"] + pretrain["val"]["tokens"] == 5145
    assert pretrain["sources"][0]["name"] == "the-verdict"
    assert pretrain["sources"][0]["sha256"] == download["outputs"]["files"]["the-verdict"]["sha256"]
    shard_paths = [s["path"] for split in ("train", "val") for s in pretrain[split]["shards"]]
    assert len(shard_paths) == 6 and all(Path(p).is_absolute() and Path(p).is_file() for p in shard_paths)
    assert sum(len(read_shard(p)) for p in shard_paths) == 5145
    assert {split: part["rows"] for split, part in outputs["spam"].items()} == {"train": 1045, "validation": 149,
                                                                               "test": 300}
    assert {split: part["rows"] for split, part in outputs["instruct"].items()} == {"train": 935, "test": 110,
                                                                                   "validation": 55}
    assert all(Path(part[key]).is_absolute() for part in outputs["instruct"].values() for key in ("path", "json_path"))

    again = run_stage("tokenize", profile, {"download": download})
    assert again["cached"] is True and again["key"] == manifest["key"]
    # How many encoders, or which task runner, does not change the shards: the earlier run stands.
    how = replace(profile.tokenize, workers=1, task_runner="dask", dask_workers=3)
    again = run_stage("tokenize", profile.model_copy(update={"tokenize": how}), {"download": download})
    assert again["cached"] is True and again["key"] == manifest["key"]
    cut = replace(profile.tokenize, segment_bytes=4096)  # moves shard boundaries
    other = run_stage("tokenize", profile.model_copy(update={"tokenize": cut}), {"download": download})
    assert other["cached"] is False and other["key"] != manifest["key"]

    client = MlflowClient()
    # The stage's own run; the reused calls below add runs tagged gptflow.cached with the same key.
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.tags["gptflow.key"] == manifest["key"]
    assert run.info.run_id == manifest["mlflow_run_id"]
    assert run.data.metrics["summary/train_tokens"] + run.data.metrics["summary/val_tokens"] == 5145
    assert run.data.metrics["summary/train_shards"] + run.data.metrics["summary/val_shards"] == 6
    assert run.data.metrics["summary/tokens_per_sec"] > 0 and run.data.metrics["summary/spam_train_rows"] == 1045
    assert run.data.params["source.the-verdict.sha256"] == pretrain["sources"][0]["sha256"]
    assert run.data.params["source.the-verdict.bytes"] == "20479"
    assert np.array_equal(read_shard(shard_paths[0])[:3], [40, 367, 2885])  # "I HAD always"


def test_corpus_not_downloaded(profile):
    download = {"key": "k", "outputs": {"files": {"the-verdict": {"path": "x", "sha256": "0" * 64}}}}
    profile = profile.model_copy(update={"tokenize": replace(profile.tokenize, corpora=["the-verdict", "tinyshakespeare"])})
    with pytest.raises(GptflowError, match="tinyshakespeare not downloaded; add it to download.sources"):
        run_stage("tokenize", profile, {"download": download})


def test_no_download_yet(profile):
    with pytest.raises(GptflowError, match="needs the 'download' stage's output for this profile.*"
                                           "run `gptflow stage download`"):
        run_stage("tokenize", profile)
