"""The whole pipeline as one Prefect flow: each registered stage a subflow fed its upstream manifests.

Stages whose inputs are unchanged are reused (see flows/stage.py), so a nightly run only does
the work that something changed; `force` names stages to run regardless (their downstream
re-runs too, because their new manifests change the downstream cache keys).
"""

import time
from pathlib import Path

import mlflow
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run as prefect_flow_run
from prefect.states import Completed

# Absolute imports: a Prefect deployment loads this file by path, as a module of another name,
# where relative imports would give it second copies of these modules (and of StageSkipped).
from flows import registry
from flows.crashes import mark_dead_runs_crashed, noted
from flows.manifest import code_version
from flows.resources import DEFAULT_PROFILE
from flows.settings import describe_profile, load_profile
from flows.stage import headline, run_name, run_stage, stage_key_for
from flows.tracking import configure, git_tags


def _row(stage: registry.Stage, result: dict | None, seconds: float, error: str | None = None) -> dict:
    if error is not None:
        status = "failed"
    elif result.get("skipped"):
        status = "skipped"
    else:
        status = "cached" if result.get("cached") else "done"
    value = headline((result or {}).get("metrics", {})).get(stage.headline)
    return {"stage": stage.name, "status": status, "cached": status == "cached", "seconds": round(seconds, 1),
            "metric": stage.headline if value is not None else "", "value": value,
            "note": error or (result or {}).get("reason", "")}


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'stage':<10}{'status':<9}{'seconds':>9}  headline"]
    for r in rows:
        value = f"{r['metric']} = {r['value']:.4g}" if r["metric"] else ""
        lines.append(f"{r['stage']:<10}{r['status']:<9}{r['seconds']:>9.1f}  {value} {r['note']}".rstrip())
    return "\n".join(lines)


def _run_stage_in_flow(name: str, profile, upstream: dict[str, dict] | None = None, force: bool = False):
    result = run_stage(name, profile, upstream, force)
    if result.get("cached"):
        # A state of type Completed named Cached: the Prefect UI shows which stages were reused.
        return Completed(name="Cached", data=result,
                         message=f"inputs unchanged: reused output {result['key']} of {result['created']} "
                                 f"(MLflow run {result.get('mlflow_run_id')})")
    return result


def run_stage_flow(name: str, profile, upstream: dict[str, dict], force: bool = False) -> dict:
    """run_stage as a Prefect flow run of the flow named after the stage, the run named as its
    MLflow run is (flows.stage.run_name)."""
    stage = registry.get(name)
    key = stage_key_for(stage, profile, {u: upstream[u] for u in stage.upstream_for(profile.section(name))})
    as_flow = flow(name=name, log_prints=True, flow_run_name=run_name(name, profile, key))(_run_stage_in_flow)
    return as_flow(name, profile, upstream, force=force)


def _pipeline_run_name() -> str:
    params = prefect_flow_run.parameters
    source = Path(params.get("config") or DEFAULT_PROFILE).stem
    force = params.get("force") or []
    return f"pipeline {describe_profile(source, params.get('overrides') or [])}" + (
        f" force={','.join(force)}" if force else "")


@flow(name="gptflow-pipeline", log_prints=True, flow_run_name=_pipeline_run_name)
def pipeline_flow(config: str | None = None, overrides: list[str] | None = None,
                  force: list[str] | None = None) -> list[dict]:
    """Every registered stage in order, each as a subflow."""
    profile = load_profile(config, overrides or [])
    force = registry.check_names(force or [])
    configure(profile.mlflow_config)
    rows, results = [], {}
    tags = {"gptflow.stage": "pipeline", "gptflow.config": str(config or DEFAULT_PROFILE),
            "gptflow.code_version": code_version(), **git_tags()}
    flow_run_id = str(prefect_flow_run.id) if prefect_flow_run.id else None
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
        mark_dead_runs_crashed(profile.data_dir)
    with noted(profile.data_dir, flow_run_id), mlflow.start_run(run_name=f"pipeline {profile.describe()}", tags=tags):
        mlflow.log_params({"config": tags["gptflow.config"], "overrides": " ".join(overrides or []),
                           "force": ",".join(sorted(force))})
        try:
            for stage in registry.STAGES:
                upstream = {u: results[u] for u in stage.upstream_for(profile.section(stage.name))}
                started = time.perf_counter()
                try:
                    results[stage.name] = run_stage_flow(stage.name, profile, upstream, force=stage.name in force)
                except Exception as err:
                    rows.append(_row(stage, None, time.perf_counter() - started, str(err)))
                    raise
                rows.append(_row(stage, results[stage.name], time.perf_counter() - started))
                if rows[-1]["value"] is not None:
                    mlflow.log_metric(f"{stage.name}.{stage.headline}", rows[-1]["value"])
        finally:
            summary = format_summary(rows)
            print(summary)
            mlflow.log_text(summary + "\n", "summary.txt")
            mlflow.log_dict(rows, "summary.json")
            mlflow.set_tags({f"stage.{r['stage']}": r["status"] for r in rows})
            if prefect_flow_run.id:
                create_table_artifact(rows, key="pipeline-summary", description="gptflow pipeline run")
    return rows
