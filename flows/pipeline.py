"""The whole pipeline as one Prefect flow: each registered stage a subflow fed its upstream manifests
(the body, shared with a run that has nothing to orchestrate, is flows/run_all.py).

Stages whose inputs are unchanged are reused (see flows/stage.py), so a nightly run only does
the work that something changed; `force` names stages to run regardless (their downstream
re-runs too, because their new manifests change the downstream cache keys).
"""

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run as prefect_flow_run
from prefect.states import Completed

# Absolute imports: a Prefect deployment loads this file by path, as a module of another name,
# where relative imports would give it second copies of these modules (and of StageSkipped).
from flows import registry
from flows.resources import DEFAULT_PROFILE
from flows.run_all import run_all
from flows.settings import describe_profile
from flows.stage import run_name, run_stage, stage_key_for


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
    return run_all(config, overrides or [], force or [], run_stage_flow, str(prefect_flow_run.id),
                   publish=lambda rows: create_table_artifact(rows, key="pipeline-summary",
                                                              description="gptflow pipeline run"))
