"""Scheduled pipeline runs: the pipeline flow served as a Prefect deployment with a cron schedule."""

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from prefect import serve
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.settings import PREFECT_API_URL

from gpt_core.errors import GptflowError

from .pipeline import pipeline_flow
from .settings import load_profile


def build_deployment(name: str, cron: str, config: str | None, overrides: list[str],
                     timezone: str = "UTC") -> RunnerDeployment:
    load_profile(config, overrides)  # a bad profile fails now, not at 3 a.m.
    try:
        ZoneInfo(timezone)
    except (ValueError, ZoneInfoNotFoundError):
        raise GptflowError(f"--timezone: '{timezone}' is not an IANA time zone (e.g. Europe/Paris)") from None
    try:
        schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValueError:
        raise GptflowError(f"--cron: '{cron}' is not a valid cron expression") from None
    return pipeline_flow.to_deployment(
        name=name, schedule=schedule, parameters={"config": config, "overrides": overrides},
        description="gptflow: download -> tokenize -> pretrain -> spam, lora, instruct -> judge",
        tags=["gptflow"])


def serve_pipeline(name: str, cron: str, config: str | None, overrides: list[str], timezone: str = "UTC"):
    """Register the deployment and run its scheduled flow runs in this process until stopped."""
    if not PREFECT_API_URL.value():
        raise GptflowError("no Prefect server configured: start one with `prefect server start` and run "
                           "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`")
    serve(build_deployment(name, cron, config, overrides, timezone))
