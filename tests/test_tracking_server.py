"""mlflow.yaml pointed at a team's tracking server: a database backend and the server's artifact store."""

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import free_port, wait_until_healthy

from flows.download import Config as DownloadConfig
from flows.settings import profile_model
from flows.stage import run_stage

Profile = profile_model()

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracking_server(tmp_path):
    port = free_port()
    store = tmp_path / "artifact-store"
    with open(tmp_path / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", store.as_uri(), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/health", server, tmp_path / "server.log")
        yield url, store
    finally:
        server.terminate()
        server.wait(30)


def test_stages_log_to_a_tracking_server_and_its_artifact_store(tracking_server, tmp_path, monkeypatch, mirror):
    url, store = tracking_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = tmp_path / "mlflow.yaml"
    config.write_text(f"tracking_uri: {url}\nexperiment: team\nartifact_location: null\n")
    profile = Profile(data_dir=tmp_path / "data", mlflow_config=config, download=DownloadConfig(sources=["the-verdict"]))
    manifest = run_stage("download", profile)

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("team")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["gptflow.stage"] == "download"
    # Artifacts went through the server into its store, not onto this machine's mlruns folder.
    assert [p.name for p in store.rglob("manifest.json")] == ["manifest.json"]
    assert not (ROOT / "mlruns" / experiment.experiment_id).exists()
