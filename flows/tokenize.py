"""Tokenize stage: pretraining corpora -> Parquet token shards, plus the fine-tuning splits."""

from pathlib import Path

import mlflow
from prefect import flow

from gpt_core.errors import GptflowError
from gpt_core.shards import tokenize_corpora
from gpt_core.supervised import prepare_instructions, prepare_spam

from .manifest import latest_manifest
from .settings import Profile
from .stage import run_stage

SUPERVISED = ("sms-spam", "instruction-data")  # prepared whenever the download stage fetched them


def run_tokenize(profile: Profile, download: dict | None = None, force: bool = False) -> dict:
    download = download or latest_manifest(profile.data_dir, "download")
    files = download["outputs"]["files"]
    config = profile.tokenize
    missing = [name for name in config.corpora if name not in files]
    if missing:
        raise GptflowError(f"tokenize.corpora: {', '.join(missing)} not downloaded; "
                           "add it to download.sources and run the download stage")

    def body(folder: Path, _upstream):
        pretrain = tokenize_corpora([Path(files[name]["path"]) for name in config.corpora], folder / "pretrain",
                                    shard_tokens=config.shard_tokens, val_fraction=config.val_fraction,
                                    threads=config.threads)
        for name, source in zip(config.corpora, pretrain["sources"]):
            source["name"] = name
        used = [*config.corpora, *(name for name in SUPERVISED if name in files)]
        for name in used:
            mlflow.log_params({f"source.{name}.sha256": files[name]["sha256"],
                               f"source.{name}.bytes": Path(files[name]["path"]).stat().st_size})
        outputs = {"pretrain": pretrain}
        metrics = {"train_tokens": pretrain["train"]["tokens"], "val_tokens": pretrain["val"]["tokens"],
                   "train_shards": len(pretrain["train"]["shards"]), "val_shards": len(pretrain["val"]["shards"]),
                   "tokens_per_sec": pretrain["tokens_per_sec"]}
        if "sms-spam" in files:
            outputs["spam"] = prepare_spam(files["sms-spam"]["path"], folder / "spam", seed=config.spam_seed)
            metrics.update({f"spam_{split}_rows": part["rows"] for split, part in outputs["spam"].items()})
        if "instruction-data" in files:
            outputs["instruct"] = prepare_instructions(files["instruction-data"]["path"], folder / "instruct")
            metrics.update({f"instruct_{split}_rows": part["rows"] for split, part in outputs["instruct"].items()})
        return outputs, metrics

    return run_stage("tokenize", profile, config, {"download": download}, body, force)


@flow(name="tokenize", log_prints=True)
def tokenize_flow(profile: Profile, download: dict | None = None, force: bool = False) -> dict:
    return run_tokenize(profile, download, force)
