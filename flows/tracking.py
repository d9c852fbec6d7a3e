"""MLflow conventions shared by every stage: one (nested) run per stage, params from the
resolved config, manifests and plots as artifacts, models registered under an alias."""

import functools
import os
import subprocess
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from gpt_core.errors import GptflowError

from . import plots

DEFAULTS = {"tracking_uri": "sqlite:///mlflow.db", "experiment": "gptflow",
            "artifact_location": "mlruns", "model_alias": "newest"}


def load_config(path: str | Path = "mlflow.yaml") -> dict:
    path = Path(path)
    values = dict(DEFAULTS)
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise GptflowError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
        values.update(loaded)
    values["tracking_uri"] = os.environ.get("MLFLOW_TRACKING_URI", values["tracking_uri"])
    return values


def configure(path: str | Path = "mlflow.yaml") -> dict:
    """Point MLflow at the configured backend and experiment; returns the settings."""
    settings = load_config(path)
    mlflow.set_tracking_uri(settings["tracking_uri"])
    if mlflow.get_experiment_by_name(settings["experiment"]) is None:
        location = settings["artifact_location"]
        if location and "://" not in location:
            location = Path(location).resolve().as_uri()
        # None: a tracking server's own artifact store (`mlflow server --artifacts-destination`).
        mlflow.create_experiment(settings["experiment"], artifact_location=location or None)
    mlflow.set_experiment(settings["experiment"])
    return settings


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class MlflowLogger:
    """gpt_core.tracking.MetricLogger into one MLflow run, addressed by id, so that processes other
    than the one that opened the run (torchrun's ranks) can log into it too."""

    def __init__(self, run_id: str):
        self.client, self.run_id = MlflowClient(), run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int):
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_params(self, params: Mapping[str, object]):
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_text(self, text: str, name: str):
        self.client.log_text(self.run_id, text, name)


@functools.cache
def git_tags() -> dict[str, str]:
    """MLflow's git-commit tag for the checkout the code runs from, when it is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit}


def _prefect_flow_run_id() -> str | None:
    from prefect.runtime import flow_run
    return flow_run.id


@contextmanager
def stage_run(stage: str, config: dict, mlflow_config: str | Path = "mlflow.yaml", tags: dict | None = None,
              run_id_file: Path | None = None, run_name: str | None = None):
    """An MLflow run for one stage, nested under the pipeline's run when one is active.

    With `run_id_file`, a stage that crashed and is started again continues the MLflow run it
    had begun, so its metric curves continue instead of starting over in a new run.
    """
    configure(mlflow_config)
    run_tags = {"gptflow.stage": stage, **(tags or {})}
    flow_run_id = _prefect_flow_run_id()
    if flow_run_id:
        run_tags["prefect.flow_run_id"] = str(flow_run_id)
    previous = _unfinished_run(run_id_file)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_id=previous, run_name=None if previous else run_name or stage, nested=nested,
                          tags=run_tags) as run:
        if run_id_file is not None:
            run_id_file.write_text(run.info.run_id)
        if previous is None:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config).items()})
        yield run


def _unfinished_run(run_id_file: Path | None) -> str | None:
    if run_id_file is None or not run_id_file.is_file():
        return None
    run_id = run_id_file.read_text().strip()
    try:
        status = MlflowClient().get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None
    return run_id if status != "FINISHED" else None


def run_link(run_id: str) -> str:
    """A link to the run in the MLflow UI: the tracking server's, or `mlflow ui`'s default address."""
    uri = mlflow.get_tracking_uri()
    try:
        experiment = mlflow.get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException:
        return f"`{run_id}`"
    if uri.startswith(("http://", "https://")):
        return f"[{run_id}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
    return f"[{run_id}](http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}) (with `mlflow ui` running)"


def log_figure(fig, folder: Path, name: str):
    """Save a matplotlib figure as folder/name, log it to the active run, and free it."""
    fig.savefig(folder / name, dpi=120)
    mlflow.log_figure(fig, name)
    plots.close(fig)


def log_model(folder: Path, registered_name: str, mlflow_config: str | Path = "mlflow.yaml") -> str:
    """Log a model folder as the run's `model` artifact and register it; returns its models:/ URI."""
    settings = load_config(mlflow_config)
    run = mlflow.active_run()
    mlflow.log_artifacts(str(folder), artifact_path="model")
    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name='{registered_name}'"):
        client.create_registered_model(registered_name)
    version = client.create_model_version(
        registered_name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(registered_name, settings["model_alias"], version.version)
    return f"models:/{registered_name}@{settings['model_alias']}"


def resolve_model(spec: str, mlflow_config: str | Path = "mlflow.yaml") -> str:
    """A local folder for an MLflow model URI (models:/..., runs:/...); other specs unchanged."""
    if not spec.startswith(("models:/", "runs:/")):
        return spec
    mlflow.set_tracking_uri(load_config(mlflow_config)["tracking_uri"])
    try:
        return mlflow.artifacts.download_artifacts(spec)
    except mlflow.exceptions.MlflowException as err:
        raise GptflowError(f"cannot resolve model {spec}: {err.message.splitlines()[0]}") from None
