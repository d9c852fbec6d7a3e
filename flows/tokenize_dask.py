"""The tokenize stage's segments as Prefect task runs on a Dask cluster (`task_runner: dask`)."""

import os
from pathlib import Path

from prefect import flow, task, unmapped

from gpt_core.errors import GptflowError
from gpt_core.shards import Segment, tokenize_segment


def dask_runner(config):
    """The Dask task runner the config asks for, and the encoders each task runs."""
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise GptflowError("tokenize.task_runner 'dask' needs prefect-dask: pip install 'gptflow[cluster]'") from None
    if config.dask_address:
        return DaskTaskRunner(address=config.dask_address), config.workers
    from prefect.client.orchestration import get_client
    dask_workers = config.dask_workers or os.cpu_count() or 1
    encoders = config.workers or max(1, (os.cpu_count() or 1) // dask_workers)
    # The workers report their task runs to this run's Prefect API, a temporary one included.
    env = {"PREFECT_API_URL": str(get_client().api_url)}
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None, "env": env}), encoders


@task(name="tokenize-segment", retries=1)
def tokenize_segment_task(segment: Segment, out_dir: Path, shard_tokens: int, workers: int) -> dict:
    return tokenize_segment(segment, out_dir, shard_tokens, workers)


@flow(name="tokenize-segments")
def segments_on_dask(segments: list[Segment], out_dir: Path, shard_tokens: int, workers: int) -> list[dict]:
    """Every segment as a task on the flow's task runner; results in plan order."""
    futures = tokenize_segment_task.map(segments, unmapped(out_dir), unmapped(shard_tokens), unmapped(workers))
    return [future.result() for future in futures]
