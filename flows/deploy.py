"""Scheduled pipeline runs: the pipeline flow served as a Prefect deployment with a cron schedule."""

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.settings import PREFECT_API_URL

from gpt_core.errors import GptflowError

from .pipeline import pipeline_flow
from .settings import load_profile


def build_deployment(name: str, cron: str, config: str | None, overrides: list[str]) -> RunnerDeployment:
    load_profile(config, overrides)  # a bad profile fails now, not at 3 a.m.
    try:
        CronSchedule(cron=cron)
    except ValueError:
        raise GptflowError(f"--cron: '{cron}' is not a valid cron expression") from None
    return pipeline_flow.to_deployment(
        name=name, cron=cron, parameters={"config": config, "overrides": overrides},
        description="gptflow: download -> tokenize -> pretrain -> spam, lora, instruct -> judge",
        tags=["gptflow"])


def serve_pipeline(name: str, cron: str, config: str | None, overrides: list[str]):
    """Register the deployment and run its scheduled flow runs in this process until stopped."""
    if not PREFECT_API_URL.value():
        raise GptflowError("no Prefect server configured: start one with `prefect server start` and run "
                           "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`")
    serve(build_deployment(name, cron, config, overrides))
