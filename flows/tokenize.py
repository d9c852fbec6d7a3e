"""Tokenize stage: pretraining corpora -> Parquet token shards, plus the fine-tuning splits.

With `task_runner: dask` each corpus segment is a Prefect task run on a Dask cluster (a running
one at `dask_address`, or a temporary local one); every worker must see the data folder.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import mlflow
from prefect import flow, task, unmapped

from gpt_core.errors import GptflowError
from gpt_core.settings import Settings, SettingsError, setting
from gpt_core.shards import Segment, tokenize_corpora, tokenize_segment
from gpt_core.supervised import prepare_instructions, prepare_spam

from .settings import stage_config

SUPERVISED = ("sms-spam", "instruction-data")  # prepared whenever the download stage fetched them


@stage_config
@dataclass(frozen=True)
class Config(Settings):
    corpora: list[str] = field(default_factory=lambda: ["tinyshakespeare"],
                               metadata={"doc": "downloaded sources to pretrain on"})
    shard_tokens: int = setting(1_000_000, gt=0, doc="tokens per Parquet shard")
    val_fraction: float = setting(0.1, gt=0, lt=1, doc="share of each corpus held out for validation")
    workers: int = setting(0, ge=0, doc="encoding processes per task; 0 = one per CPU core")
    segment_bytes: int = setting(256 << 20, gt=0, doc="bytes of corpus per tokenize task")
    task_runner: Literal["local", "dask"] = setting(
        "local", doc="local: segments one after another in this process; dask: segments as Prefect tasks on a "
                     "Dask cluster")
    dask_address: str | None = setting(None, doc="scheduler of a running Dask cluster (tcp://host:8786); none: a "
                                                 "temporary local cluster")
    dask_workers: int | None = setting(None, gt=0, doc="workers of the temporary local cluster")
    spam_seed: int = setting(123, doc="seed of the book's balanced spam split")
    # segment_bytes stays in the key: segments write their own shards, so it moves shard boundaries.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"workers", "task_runner", "dask_address", "dask_workers"})

    def __post_init__(self):
        super().__post_init__()
        if not self.corpora:
            raise SettingsError("corpora must name at least one downloaded source")


def run(ctx) -> tuple[dict, dict]:
    files = ctx.upstream["download"]["outputs"]["files"]
    config, folder = ctx.config, ctx.folder
    missing = [name for name in config.corpora if name not in files]
    if missing:
        raise GptflowError(f"tokenize.corpora: {', '.join(missing)} not downloaded; "
                           "add it to download.sources and run the download stage")
    out_dir = folder / "pretrain"
    run_segments = None
    if config.task_runner == "dask":
        runner, workers = dask_runner(config)

        def run_segments(segments):
            return segments_on_dask.with_options(task_runner=runner)(segments, out_dir, config.shard_tokens, workers)
    pretrain = tokenize_corpora([Path(files[name]["path"]) for name in config.corpora], out_dir,
                                shard_tokens=config.shard_tokens, val_fraction=config.val_fraction,
                                workers=config.workers, segment_bytes=config.segment_bytes,
                                run_segments=run_segments)
    for name, source in zip(config.corpora, pretrain["sources"]):
        source["name"] = name
    used = [*config.corpora, *(name for name in SUPERVISED if name in files)]
    for name in used:
        mlflow.log_params({f"source.{name}.sha256": files[name]["sha256"],
                           f"source.{name}.bytes": Path(files[name]["path"]).stat().st_size})
    outputs = {"pretrain": pretrain}
    metrics = {"train_tokens": pretrain["train"]["tokens"], "val_tokens": pretrain["val"]["tokens"],
               "train_shards": len(pretrain["train"]["shards"]), "val_shards": len(pretrain["val"]["shards"]),
               "segments": pretrain["segments"], "tokens_per_sec": pretrain["tokens_per_sec"]}
    if "sms-spam" in files:
        outputs["spam"] = prepare_spam(files["sms-spam"]["path"], folder / "spam", seed=config.spam_seed)
        metrics.update({f"spam_{split}_rows": part["rows"] for split, part in outputs["spam"].items()})
    if "instruction-data" in files:
        outputs["instruct"] = prepare_instructions(files["instruction-data"]["path"], folder / "instruct")
        metrics.update({f"instruct_{split}_rows": part["rows"] for split, part in outputs["instruct"].items()})
    return outputs, metrics


def dask_runner(config: Config):
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
