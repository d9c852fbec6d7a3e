"""Tokenize stage: pretraining corpora -> Parquet token shards, plus the fine-tuning splits.

With `task_runner: dask` each corpus segment is a Prefect task run on a Dask cluster (a running
one at `dask_address`, or a temporary local one); every worker must see the data folder.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import mlflow

from gpt_core.errors import GptflowError
from gpt_core.settings import Settings, SettingsError, setting
from gpt_core.shards import tokenize_corpora
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
        from .tokenize_dask import (  # Prefect and Dask: only when asked for
            dask_runner,
            segments_on_dask,
        )
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
