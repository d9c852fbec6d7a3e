"""The skeleton every stage shares: cache lookup, MLflow run, manifest.

A stage module's `run(ctx)` gets a StageContext (its config, upstream manifests, output folder,
metric logger, and what its optional `prepare(profile, config, upstream)` checked and loaded
before anything was written) and returns (outputs, metrics); everything around it lives here: deciding, once
and before the stage prepares anything, whether it needs to run at all; finding the upstream
outputs its own profile would produce; opening the tracking run; recording lineage; writing the
manifest last.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow

from gpt_core.compiled import keep_compiled_code_in
from gpt_core.errors import GptflowError
from gpt_core.metrics import SUMMARY_PREFIX

from . import registry
from .locks import stage_lock
from .manifest import (
    MANIFEST,
    code_version,
    read_manifest,
    record_use,
    stage_dir,
    stage_key,
    write_manifest,
)
from .settings import ProfileBase, config_dict, key_config
from .tracking import MlflowLogger, prefect_flow_run_id, run_link, stage_run

log = logging.getLogger("gptflow")


class StageSkipped(Exception):
    """Raised by a stage's prepare() when it cannot run now but need not fail the pipeline (an
    optional judge without a server): the stage is reported skipped, with this reason, leaves a
    finished MLflow run tagged gptflow.skipped, and writes no manifest."""


@dataclass
class StageContext:
    stage: registry.Stage
    profile: ProfileBase
    config: object
    upstream: dict[str, dict]
    folder: Path
    logger: MlflowLogger
    prepared: object = None  # what the module's prepare() returned

    @property
    def run_id(self) -> str:
        return self.logger.run_id


@dataclass(frozen=True)
class _Plan:
    stage: registry.Stage
    config: object
    upstream: dict[str, dict]
    key: str
    folder: Path


def plan_for(stage: registry.Stage, profile: ProfileBase, upstream: dict[str, dict]) -> _Plan:
    config = profile.section(stage.name)
    inputs = getattr(stage.implementation, "inputs", None)
    full = {**upstream, **(inputs(profile, config) if inputs else {})}
    key = stage_key(stage.name, key_config(config), full)
    return _Plan(stage, config, full, key, stage_dir(profile.data_dir, stage.name, key))


def stage_key_for(stage: registry.Stage, profile: ProfileBase, upstream: dict[str, dict]) -> str:
    """The key of the output `stage` produces from these upstream manifests under this profile."""
    return plan_for(stage, profile, upstream).key


def output_folder(name: str, profile: ProfileBase) -> Path:
    """Where the output `name` would produce under this profile lives (produced or not)."""
    stage = registry.get(name)
    return plan_for(stage, profile, resolve_upstream(stage, profile)).folder


def existing_output(name: str, profile: ProfileBase) -> dict | None:
    """The manifest of what `name` would produce under this profile, if it has been produced."""
    return read_manifest(output_folder(name, profile))


def resolve_upstream(stage: registry.Stage, profile: ProfileBase) -> dict[str, dict]:
    """The upstream outputs this profile's own settings produce, for a stage run on its own.

    Their keys are computed from the profile, so a stage never picks up what another profile
    wrote; a missing one is an error naming the command that makes it.
    """
    upstream = {}
    for name in stage.upstream_for(profile.section(stage.name)):
        manifest = existing_output(name, profile)
        if manifest is None:
            raise GptflowError(f"{stage.name} needs the '{name}' stage's output for this profile, and there is "
                               f"none yet: run `{profile.stage_command(name)}` first")
        upstream[name] = manifest
    return upstream


def run_stage(name: str, profile: ProfileBase, upstream: dict[str, dict] | None = None,
              force: bool = False) -> dict:
    """Run stage `name` unless an identical earlier run left its manifest; returns the manifest
    (marked `"cached"`), or `{"skipped": True, "reason": ...}` for a skipped stage.

    `upstream`: the upstream manifests (the pipeline passes what it just produced); None finds
    the ones this profile produces.
    """
    stage = registry.get(name)
    if upstream is None:
        upstream = resolve_upstream(stage, profile)
    plan = plan_for(stage, profile, {u: upstream[u] for u in stage.upstream_for(profile.section(name))})
    # A second process after the same output waits here, then finds the first one's manifest.
    with stage_lock(plan.folder, name, plan.key):
        previous = None if force else read_manifest(plan.folder)
        if previous is not None:
            log.info("%s: inputs unchanged, reusing %s (MLflow run %s)", name, plan.folder,
                     previous.get("mlflow_run_id"))
            _record_reuse(plan, profile, previous)
            record_use(plan.folder, cached=True)
            publish_summary(name, previous, cached=True)
            return {**previous, "cached": True}
        if force and plan.folder.exists():
            _set_aside(plan.folder)
        return _execute(plan, profile)


def run_name(stage: str, profile: ProfileBase, key: str) -> str:
    """What the MLflow and Prefect runs of a stage are called: the stage, the profile and the
    overrides of its own section, and the short key of its output."""
    return f"{stage} {profile.describe(stage)} {key[:8]}"


def _lineage_tags(plan: _Plan) -> dict[str, str]:
    tags = {"gptflow.key": plan.key, "gptflow.code_version": code_version()}
    tags.update({f"upstream.{u}.key": m["key"] for u, m in plan.upstream.items()})
    tags.update({f"upstream.{u}.mlflow_run_id": m["mlflow_run_id"]
                 for u, m in plan.upstream.items() if m.get("mlflow_run_id")})
    return tags


def _record_reuse(plan: _Plan, profile: ProfileBase, previous: dict):
    """A finished MLflow run for the reused stage, so every pipeline run has one per stage: tagged
    cached, carrying the stage's summary and a link to the run that produced the output."""
    producer = previous.get("mlflow_run_id")
    tags = {**_lineage_tags(plan), "gptflow.cached": "true"}
    if producer:
        tags["gptflow.produced_by"] = producer
        tags["mlflow.note.content"] = (f"Reused: inputs unchanged since {previous['created']}. The output comes "
                                       f"from run {run_link(producer)}.")
    with stage_run(plan.stage.name, config_dict(plan.config), profile.mlflow_config, tags=tags,
                   run_name=run_name(plan.stage.name, profile, plan.key) + " (cached)"):
        log_summary(previous["metrics"])


def _set_aside(folder: Path):
    """--force: the earlier output and its checkpoints move aside, so the stage trains from scratch."""
    target = folder.with_name(f"{folder.name}.replaced-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
    folder.rename(target)
    log.info("%s: --force, earlier output moved to %s", folder.parent.name, target)


def _execute(plan: _Plan, profile: ProfileBase) -> dict:
    name, resolved = plan.stage.name, config_dict(plan.config)
    tags = _lineage_tags(plan)
    title = run_name(name, profile, plan.key)
    prepare = getattr(plan.stage.implementation, "prepare", None)
    try:
        # Before the folder and the MLflow run exist: input that cannot work fails without a trace.
        prepared = prepare(profile, plan.config, plan.upstream) if prepare else None
    except StageSkipped as skipped:
        reason = str(skipped)
        log.warning("%s: skipped: %s", name, reason)
        skip_tags = {"gptflow.skipped": "true", "gptflow.skip_reason": reason[:5000], **tags}
        with stage_run(name, resolved, profile.mlflow_config, tags=skip_tags, run_name=title + " (skipped)"):
            pass
        return {"stage": name, "skipped": True, "reason": reason}
    plan.folder.mkdir(parents=True, exist_ok=True)
    # What torch.compile builds is kept with the data, so the next run (any process) reuses it.
    keep_compiled_code_in(profile.data_dir / ".cache" / "torchinductor")
    with stage_run(name, resolved, profile.mlflow_config, tags=tags, run_id_file=plan.folder / ".mlflow_run_id",
                   run_name=title) as run:
        log.info("%s: MLflow run %s", name, run.info.run_id)
        ctx = StageContext(plan.stage, profile, plan.config, plan.upstream, plan.folder,
                           MlflowLogger(run.info.run_id), prepared)
        outputs, metrics = plan.stage.implementation.run(ctx)
        manifest = write_manifest(plan.folder, name, plan.key, resolved, plan.upstream, outputs, metrics,
                                  mlflow_run_id=run.info.run_id)
        log_summary(metrics)
        mlflow.log_artifact(str(plan.folder / MANIFEST))
    record_use(plan.folder, cached=False)
    publish_summary(name, manifest, cached=False)
    return {**manifest, "cached": False}


def headline(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_summary(metrics: dict):
    """The stage's summary into the active run, under summary/, at its last optimizer step."""
    values = headline(metrics)
    if values:
        mlflow.log_metrics({SUMMARY_PREFIX + k: v for k, v in values.items()}, step=int(values.get("steps", 0)))


def publish_summary(stage: str, manifest: dict, cached: bool):
    """A markdown artifact with the stage's metrics for the Prefect UI (inside a flow run only)."""
    if not prefect_flow_run_id():
        return
    from prefect.artifacts import create_markdown_artifact
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in headline(manifest["metrics"]).items())
    origin = f"reused the output of {manifest['created']} (inputs unchanged)" if cached else "ran"
    lines = [f"## {stage}", "", f"{origin}; output `{manifest['key']}`", ""]
    if manifest.get("mlflow_run_id"):
        lines.append(f"- MLflow run: {run_link(manifest['mlflow_run_id'])}")
    lines += [f"- model: `{uri}`" for key, uri in manifest["outputs"].items() if key.endswith("model_uri")]
    create_markdown_artifact("\n".join([*lines, "", "| metric | value |", "|---|---|", rows, ""]),
                             key=f"{stage}-summary", description=f"gptflow {stage} stage")
