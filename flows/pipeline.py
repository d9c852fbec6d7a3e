"""The whole pipeline as one Prefect flow: each registered stage a subflow fed its upstream manifests.

Stages whose inputs are unchanged are reused (see flows/stage.py), so a nightly run only does
the work that something changed; `force` names stages to run regardless (their downstream
re-runs too, because their new manifests change the downstream cache keys).
"""

import functools
import time

import mlflow
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from . import registry
from .settings import load_profile
from .stage import headline, run_stage
from .tracking import configure


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


@functools.cache
def stage_flow(name: str):
    """The Prefect subflow of one stage, named after it."""
    return flow(name=name, log_prints=True)(run_stage)


@flow(name="gptflow-pipeline", log_prints=True)
def pipeline_flow(config: str | None = None, overrides: list[str] | None = None,
                  force: list[str] | None = None) -> list[dict]:
    """Every registered stage in order, each as a subflow."""
    profile = load_profile(config, overrides or [])
    force = registry.check_names(force or [])
    configure(profile.mlflow_config)
    rows, results = [], {}
    tags = {"gptflow.stage": "pipeline", "gptflow.config": str(config or "configs/default.yaml")}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)

    with mlflow.start_run(run_name="pipeline", tags=tags):
        mlflow.log_params({"config": tags["gptflow.config"], "overrides": " ".join(overrides or []),
                           "force": ",".join(sorted(force))})
        try:
            for stage in registry.STAGES:
                upstream = {name: results[name] for name in stage.upstream_for(profile.section(stage.name))}
                started = time.perf_counter()
                try:
                    results[stage.name] = stage_flow(stage.name)(stage.name, profile, upstream,
                                                                 force=stage.name in force)
                except Exception as err:
                    rows.append(_row(stage, None, time.perf_counter() - started, str(err)))
                    raise
                rows.append(_row(stage, results[stage.name], time.perf_counter() - started))
        finally:
            summary = format_summary(rows)
            print(summary)
            mlflow.log_text(summary + "\n", "summary.txt")
            mlflow.log_dict(rows, "summary.json")
            mlflow.set_tags({f"stage.{r['stage']}": r["status"] for r in rows})
            if flow_run.id:
                create_table_artifact(rows, key="pipeline-summary", description="gptflow pipeline run")
    return rows
