"""The metric logger across a resume: a second process continuing one MLflow run replays steps."""

import mlflow
from mlflow import MlflowClient

from flows.tracking import MlflowLogger


def test_a_resumed_process_adds_no_duplicate_points_and_keeps_earlier_text(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.create_experiment("resume", artifact_location=str(tmp_path / "mlruns"))
    run_id = MlflowClient().create_run(experiment).info.run_id

    first = MlflowLogger(run_id)  # the process that was killed after step 5, checkpointed at 3
    for step in range(6):
        first.log_metrics({"train/loss": 10.0 - step}, step)
    first.log_text("step 0: a\n", "samples.txt")
    first.log_text("step 0: a\nstep 4: b\n", "samples.txt")

    resumed = MlflowLogger(run_id)  # replays steps 4 and 5 with the same values, then goes on
    for step in range(4, 9):
        resumed.log_metrics({"train/loss": 10.0 - step, "lr": 0.1}, step)
    # The recipe rewrites its samples so far, which in the resumed process start at step 4.
    resumed.log_text("step 4: b\n", "samples.txt")
    resumed.log_text("step 4: b\nstep 8: c\n", "samples.txt")

    client = MlflowClient()
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(9))
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [4, 5, 6, 7, 8]
    assert (tmp_path / "samples.txt").exists() is False
    client.download_artifacts(run_id, "samples.txt", str(tmp_path))
    assert (tmp_path / "samples.txt").read_text() == "step 0: a\nstep 4: b\nstep 8: c\n"
