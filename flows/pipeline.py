"""The whole pipeline as one Prefect flow: each stage a subflow fed the previous manifests.

Stages whose inputs are unchanged are reused (see flows/stage.py), so a nightly run only does
the work that something changed; `force` names stages to run regardless (their downstream
re-runs too, because their new manifests change the downstream cache keys).
"""

import time

import mlflow
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run

from gpt_core.errors import GptflowError

from .download import download_flow
from .instruct import instruct_flow
from .judge import judge_flow
from .lora import lora_flow
from .pretrain import pretrain_flow
from .settings import load_profile
from .spam import spam_flow
from .stage import headline
from .tokenize import tokenize_flow
from .tracking import configure

STAGES = ("download", "tokenize", "pretrain", "spam", "lora", "instruct", "judge")
# The metric that sums up each stage in the run summary.
HEADLINES = {"download": "files", "tokenize": "train_tokens", "pretrain": "final/val_loss",
             "spam": "test_accuracy", "lora": "test_accuracy", "instruct": "val_loss_after",
             "judge": "mean_score"}


def _row(stage: str, result: dict | None, seconds: float, error: str | None = None) -> dict:
    if error is not None:
        status = "failed"
    elif result.get("skipped"):
        status = "skipped"
    else:
        status = "cached" if result.get("cached") else "done"
    metrics = headline((result or {}).get("metrics", {}))
    name = HEADLINES[stage]
    value = metrics.get(name)
    return {"stage": stage, "status": status, "cached": status == "cached", "seconds": round(seconds, 1),
            "metric": name if value is not None else "", "value": value,
            "note": error or (result or {}).get("reason", "")}


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'stage':<10}{'status':<9}{'seconds':>9}  headline"]
    for r in rows:
        value = f"{r['metric']} = {r['value']:.4g}" if r["metric"] else ""
        lines.append(f"{r['stage']:<10}{r['status']:<9}{r['seconds']:>9.1f}  {value} {r['note']}".rstrip())
    return "\n".join(lines)


@flow(name="gptflow-pipeline", log_prints=True)
def pipeline_flow(config: str | None = None, overrides: list[str] | None = None,
                  force: list[str] | None = None) -> list[dict]:
    """download -> tokenize -> pretrain -> spam, lora, instruct -> judge."""
    profile = load_profile(config, overrides or [])
    force = set(force or [])
    unknown = force - set(STAGES)
    if unknown:
        raise GptflowError(f"--force: unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(STAGES)}")
    configure(profile.mlflow_config)
    rows, results = [], {}
    tags = {"gptflow.stage": "pipeline", "gptflow.config": str(config or "configs/default.yaml")}
    if flow_run.id:
        tags["prefect.flow_run_id"] = str(flow_run.id)

    calls = {
        "download": lambda: download_flow(profile, force="download" in force),
        "tokenize": lambda: tokenize_flow(profile, results["download"], force="tokenize" in force),
        "pretrain": lambda: pretrain_flow(profile, results["tokenize"], force="pretrain" in force),
        "spam": lambda: spam_flow(profile, results["tokenize"], results["pretrain"], force="spam" in force),
        "lora": lambda: lora_flow(profile, results["tokenize"], results["pretrain"], force="lora" in force),
        "instruct": lambda: instruct_flow(profile, results["tokenize"], results["pretrain"],
                                          force="instruct" in force),
        "judge": lambda: judge_flow(profile, results["instruct"], force="judge" in force),
    }
    with mlflow.start_run(run_name="pipeline", tags=tags):
        mlflow.log_params({"config": tags["gptflow.config"], "overrides": " ".join(overrides or []),
                           "force": ",".join(sorted(force))})
        try:
            for stage in STAGES:
                started = time.perf_counter()
                try:
                    results[stage] = calls[stage]()
                except Exception as err:
                    rows.append(_row(stage, None, time.perf_counter() - started, str(err)))
                    raise
                rows.append(_row(stage, results[stage], time.perf_counter() - started))
        finally:
            summary = format_summary(rows)
            print(summary)
            mlflow.log_text(summary + "\n", "summary.txt")
            mlflow.log_dict(rows, "summary.json")
            mlflow.set_tags({f"stage.{r['stage']}": r["status"] for r in rows})
            if flow_run.id:
                create_table_artifact(rows, key="pipeline-summary", description="gptflow pipeline run")
    return rows
