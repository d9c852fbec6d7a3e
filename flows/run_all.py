"""Every registered stage in order: the pipeline's body, with or without Prefect around it.

The Prefect flow (flows/pipeline.py) runs each stage as a subflow. When nothing would run, every
stage's output cached or the stage skipped, `gptflow run` calls this body directly instead: the
same MLflow runs, summary and table, without the seconds a temporary Prefect server takes to
start for a run with nothing to orchestrate.
"""

import contextlib
import time
from collections.abc import Callable

import mlflow

from flows import registry
from flows.manifest import code_version, read_manifest
from flows.resources import DEFAULT_PROFILE
from flows.settings import load_profile
from flows.stage import StageSkipped, headline, plan_for, run_stage
from flows.tracking import configure, git_tags

RunOne = Callable[[str, object, dict, bool], dict]


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


def nothing_to_run(profile, force) -> bool:
    """True when every stage would be reused or skipped: the outputs exist for these inputs, or a
    stage's own check (an optional judge without a server) says it cannot run now."""
    if force:
        return False
    produced = {}
    for stage in registry.STAGES:
        config = profile.section(stage.name)
        needs = stage.upstream_for(config)
        if any(u not in produced for u in needs):
            return False  # downstream of a skipped stage: let the pipeline say what happens
        plan = plan_for(stage, profile, {u: produced[u] for u in needs})
        manifest = read_manifest(plan.folder)
        if manifest is not None:
            produced[stage.name] = manifest
            continue
        prepare = getattr(stage.implementation, "prepare", None)
        try:
            if prepare is not None:
                prepare(profile, config, plan.upstream)
        except StageSkipped:
            continue
        except Exception:  # noqa: BLE001 - the pipeline itself reports it, in its run
            return False
        return False
    return True


def run_all(config: str | None, overrides: list[str], force: list[str], run_one: RunOne = run_stage,
            flow_run_id: str | None = None, publish: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run (or reuse) every stage in order under one MLflow pipeline run; the summary rows, which
    also go to `publish` (the Prefect UI's table), even when a stage failed."""
    profile = load_profile(config, overrides)
    force = registry.check_names(force)
    configure(profile.mlflow_config)
    rows, results = [], {}
    source = str(config or DEFAULT_PROFILE)
    tags = {"gptflow.stage": "pipeline", "gptflow.config": source, "gptflow.code_version": code_version(),
            **git_tags()}
    note = contextlib.nullcontext()
    if flow_run_id:
        from flows.crashes import (  # Prefect's client: only in a flow run
            mark_dead_runs_crashed,
            noted,
        )
        tags["prefect.flow_run_id"] = flow_run_id
        mark_dead_runs_crashed(profile.data_dir)
        note = noted(profile.data_dir, flow_run_id)
    with note, mlflow.start_run(run_name=f"pipeline {profile.describe()}", tags=tags):
        mlflow.log_params({"config": source, "overrides": " ".join(overrides), "force": ",".join(sorted(force))})
        try:
            for stage in registry.STAGES:
                upstream = {u: results[u] for u in stage.upstream_for(profile.section(stage.name))}
                started = time.perf_counter()
                try:
                    results[stage.name] = run_one(stage.name, profile, upstream, stage.name in force)
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
            if publish is not None:
                publish(rows)
    return rows
