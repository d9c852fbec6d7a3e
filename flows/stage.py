"""The skeleton every stage shares: cache lookup, MLflow run, manifest.

A stage body receives its output folder and upstream manifests and returns
(outputs, metrics); everything around it — deciding whether it needs to run at all,
opening the tracking run, recording lineage, writing the manifest last — lives here.
"""

import logging
from collections.abc import Callable
from pathlib import Path

import mlflow

from .manifest import MANIFEST, read_manifest, stage_dir, stage_key, write_manifest
from .settings import Profile, Strict
from .tracking import stage_run

log = logging.getLogger("gptflow")

Body = Callable[[Path, dict[str, dict]], tuple[dict, dict]]


def cached_output(stage: str, profile: Profile, config: Strict, upstream: dict[str, dict],
                  force: bool = False) -> dict | None:
    """The manifest an identical earlier run left, marked `"cached": True`; None if it must run.

    Stages call this before their own up-front checks too, so a reused stage loads nothing.
    """
    if force:
        return None
    key = stage_key(stage, config.output_config(), upstream)
    folder = stage_dir(profile.data_dir, stage, key)
    previous = read_manifest(folder)
    if previous is None:
        return None
    log.info("%s: inputs unchanged, reusing %s", stage, folder)
    publish_summary(stage, previous, cached=True)
    return {**previous, "cached": True}


def run_stage(stage: str, profile: Profile, config: Strict, upstream: dict[str, dict], body: Body,
              force: bool = False) -> dict:
    """Run `body` unless an identical earlier run left its manifest; returns the manifest."""
    previous = cached_output(stage, profile, config, upstream, force)
    if previous is not None:
        return previous
    resolved = config.model_dump(mode="json")
    key = stage_key(stage, config.output_config(), upstream)
    folder = stage_dir(profile.data_dir, stage, key)
    folder.mkdir(parents=True, exist_ok=True)
    tags = {f"upstream.{name}.key": m["key"] for name, m in upstream.items()}
    tags.update({f"upstream.{name}.mlflow_run_id": m["mlflow_run_id"]
                 for name, m in upstream.items() if m.get("mlflow_run_id")})
    with stage_run(stage, resolved, profile.mlflow_config, tags={"gptflow.key": key, **tags},
                   run_id_file=folder / ".mlflow_run_id") as run:
        outputs, metrics = body(folder, upstream)
        manifest = write_manifest(folder, stage, key, resolved, upstream, outputs, metrics,
                                  mlflow_run_id=run.info.run_id)
        if headline(metrics):
            mlflow.log_metrics(headline(metrics))
        mlflow.log_artifact(str(folder / MANIFEST))
    publish_summary(stage, manifest, cached=False)
    return {**manifest, "cached": False}


def headline(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def publish_summary(stage: str, manifest: dict, cached: bool):
    """A markdown artifact with the stage's metrics for the Prefect UI (inside a flow run only)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run
    if not flow_run.id:
        return
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in headline(manifest["metrics"]).items())
    origin = f"reused the output of {manifest['created']} (inputs unchanged)" if cached else "ran"
    create_markdown_artifact(
        f"## {stage}\n\n{origin}; output `{manifest['key']}`\n\n| metric | value |\n|---|---|\n{rows}\n",
        key=f"{stage}-summary", description=f"gptflow {stage} stage")
