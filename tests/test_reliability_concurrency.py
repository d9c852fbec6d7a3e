"""Two gptflow commands at once on one fresh working folder and one fresh MLflow database."""

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def test_two_stage_commands_at_once_share_the_output_and_the_database(tmp_path, mirror):
    home = tmp_path / "home"
    home.mkdir()
    commands = []
    for n in range(2):
        # Each has its own Prefect home: the lock under test is gptflow's, on the data and MLflow db.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env = {**env, "GPTFLOW_HOME": str(home), "GPTFLOW_MIRROR": str(mirror),
               "PREFECT_HOME": str(tmp_path / f"prefect-{n}"), "PYTHONPATH": str(ROOT)}
        commands.append(subprocess.Popen([sys.executable, "-m", "flows.cli", "stage", "download", "--config", "smoke"],
                                         cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in commands]
    for code, out, err in results:
        assert code == 0, err[-2000:]
    states = sorted(out.strip().split(":")[1].split("->")[0].strip() for _, out, _ in results)
    assert states == ["done", "reused (cached)"]
    waited = [err for _, _, err in results if "waiting for download" in err]
    assert len(waited) <= 1

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert len(client.search_runs([experiment.experiment_id])) == 2
