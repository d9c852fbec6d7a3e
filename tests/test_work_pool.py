"""The pipeline on a real Prefect server's process work pool: prefect.yaml deploys it, a worker runs it."""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import free_port, wait_until_healthy

from flows import registry

ROOT = Path(__file__).resolve().parents[1]


def prefect(*args, env, timeout=180) -> str:
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_CLI_PROMPT": "false"}
    with open(home / "server.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(f"{url}/health", process, home / "server.log")
        yield env
    finally:
        process.terminate()
        process.wait(120)


def test_a_process_worker_runs_the_smoke_pipeline_deployed_from_prefect_yaml(server, tmp_path, tracking, mirror):
    prefect("work-pool", "create", "gptflow", "--type", "process", env=server)
    prefect("--no-prompt", "deploy", "--name", "smoke", env=server)

    # Flow runs inherit the worker's environment: here, this test's MLflow store.
    worker_env = {**server, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gptflow",
                                   "--limit", "1"], cwd=tmp_path, env=worker_env, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        overrides = [f"data_dir={tmp_path / 'data'}", f"mlflow_config={tracking}", "judge.host=http://127.0.0.1:9"]
        params = json.dumps({"config": "smoke", "overrides": overrides})
        started = prefect("deployment", "run", "gptflow-pipeline/smoke", "--params", params, env=server)
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
        state = wait_for(flow_run_id, server, timeout=480)
        assert state.is_completed(), (state, (tmp_path / "worker.log").read_text()[-3000:])
    finally:
        worker.terminate()
        worker.wait(120)

    # The worker's flow run did the work: the stages' outputs and the pipeline's MLflow run exist.
    for stage in registry.names():
        if stage == "judge":  # the smoke profile's judge has no server here
            continue
        assert list((tmp_path / "data" / stage).glob("*/manifest.json")), stage
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                              "tags.`gptflow.stage` = 'pipeline'")
    assert [r.data.tags.get("prefect.flow_run_id") for r in runs] == [flow_run_id]


def wait_for(flow_run_id: str, env: dict, timeout: float):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def poll():
        async with get_client() as client:
            deadline = time.time() + timeout
            while True:
                run = await client.read_flow_run(flow_run_id)
                if run.state.is_final() or time.time() > deadline:
                    return run.state
                await asyncio.sleep(2)

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(poll())
