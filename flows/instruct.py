"""Instruct stage: fine-tune a base model to follow instructions (the book's chapter 7) and write
its answers to the test split, which the judge stage scores."""

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient

from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.recipes.instruct import (
    SPLITS,
    InstructSettings,
    fine_tune_instructions,
    prepare_instructions,
)
from gpt_core.settings import setting
from gpt_core.supervised import read_instructions

from . import plots
from .settings import BASE_MODEL_DOC, FineTuning, stage_config
from .settings import base_model_inputs as inputs  # noqa: F401  (the stage's cache-key hook)
from .tracking import ModelScore, log_datasets, log_figure, log_model


@stage_config
@dataclass(frozen=True)
class Config(InstructSettings, FineTuning):
    base_model: str = setting("pretrain", doc=BASE_MODEL_DOC)
    registered_name: str = setting("gptflow-instruct", doc="MLflow registered model name")


def log_table(frame: pd.DataFrame, artifact_file: str):
    """mlflow.log_table, except that a table left by a crashed attempt of this (resumed) run is
    replaced: mlflow.log_table would append the rows again."""
    run_id = mlflow.active_run().info.run_id
    if not any(a.path == artifact_file for a in MlflowClient().list_artifacts(run_id)):
        mlflow.log_table(data=frame, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / artifact_file
        frame.to_json(path, orient="split", index=False, date_format="iso")  # log_table's format
        mlflow.log_artifact(str(path))


def prepare(profile, config, upstream):
    """Data, device and base model, checked before the stage starts: bad input fails up front."""
    splits = upstream["tokenize"]["outputs"].get("instruct")
    if splits is None:
        raise GptflowError("the tokenize stage prepared no instruction data: add instruction-data to "
                           "download.sources, then run the download and tokenize stages")
    entries = {split: read_instructions(splits[split]["json_path"]) for split in SPLITS}
    return prepare_instructions(config.base_model_path(upstream), config, entries)


def run(ctx) -> tuple[dict, dict]:
    cfg, folder = ctx.config, ctx.folder
    entries = ctx.prepared.entries
    # The stage reads the JSON copy of each split (read_instructions in prepare).
    log_datasets(ctx.upstream["tokenize"]["outputs"]["instruct"], "instruct", "json_path", "json_sha256")
    result = fine_tune_instructions(ctx.prepared, folder, logger=ctx.logger)
    log_figure(plots.loss_curve(result.training.history, f"Instruction fine-tuning ({cfg.style})"), folder, "loss.png")

    responses = result.responses
    (folder / "responses.json").write_text(json.dumps(responses, indent=1, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    frame = pd.DataFrame(responses, columns=["instruction", "input", "output", "model_response"])
    frame.to_parquet(folder / "responses.parquet", index=False)
    log_table(frame, "responses.json")

    model_dir = result.model_dir
    history = result.training.history
    before, after = history[0], history[-1]
    registered = log_model(model_dir, cfg.registered_name, ctx.profile.mlflow_config,
                           score=ModelScore("val_loss_after", after.get("val_loss"), "min"))
    outputs = {"model": str(model_dir), "model_sha256": sha256_file(model_dir / "model.safetensors"),
               "model_uri": registered.uri, "model_version": registered.version, "style": cfg.style, "loss_plot": str(folder / "loss.png"),
               "responses": str(folder / "responses.json"),
               "responses_sha256": sha256_file(folder / "responses.json"),
               "responses_parquet": str(folder / "responses.parquet"),
               "responses_parquet_sha256": sha256_file(folder / "responses.parquet"),
               "precision": result.training.precision,
               "counts": {split: len(entries[split]) for split in SPLITS}}
    answers = [r["model_response"] for r in responses]
    metrics = {"val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
               "final/train_loss": after["train_loss"], "best_val_loss": result.training.best_val_loss,
               "steps": result.training.steps, "tokens_seen": result.training.tokens_seen,
               "trainable_parameters": result.trainable_parameters,
               "truncated_examples": result.truncated_examples, "n_responses": len(responses),
               "n_empty_responses": sum(not answer.strip() for answer in answers)}
    return outputs, metrics
