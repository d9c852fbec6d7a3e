"""Spam stage: fine-tune a base model into an SMS spam classifier (the book's chapter 6).

The LoRA stage (flows/lora.py) runs the same `run` with adapters.
"""

from dataclasses import dataclass

import mlflow
import pandas as pd

from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.lora import ADAPTERS_FILE
from gpt_core.recipes.classifier import (
    SPLITS,
    ClassifierSettings,
    fine_tune_classifier,
    prepare_classifier,
)
from gpt_core.settings import setting

from . import plots
from .settings import BASE_MODEL_DOC, FineTuning, stage_config
from .settings import base_model_inputs as inputs  # noqa: F401  (the stage's cache-key hook)
from .tracking import ModelScore, log_datasets, log_figure, log_model

METRIC_PREFIX = {"train": "train", "validation": "val", "test": "test"}
FINAL_METRICS = ("accuracy", "precision", "recall", "f1", "loss")


@stage_config
@dataclass(frozen=True)
class Config(ClassifierSettings, FineTuning):
    base_model: str = setting("pretrain", doc=BASE_MODEL_DOC)
    registered_name: str = setting("gptflow-spam", doc="MLflow registered model name")


def spam_splits(tokenize: dict) -> dict[str, pd.DataFrame]:
    """The tokenize stage's spam splits as frames with columns text and label."""
    splits = tokenize["outputs"].get("spam")
    if splits is None:
        raise GptflowError("the tokenize stage prepared no spam splits: add sms-spam to download.sources, "
                           "then run the download and tokenize stages")
    frames = {}
    for split in SPLITS:
        try:
            frames[split] = pd.read_parquet(splits[split]["path"])
        except OSError as err:
            raise GptflowError(f"cannot read the spam {split} split: {err}; "
                               "re-run `gptflow stage tokenize --force`") from None
    return frames


def prepare(profile, config, upstream):
    """Data, device and base model, checked before the stage starts: bad input fails up front."""
    return prepare_classifier(config.base_model_path(upstream), config, spam_splits(upstream["tokenize"]))


def run(ctx) -> tuple[dict, dict]:
    """Fine-tune, evaluate, plot and register a classifier: the spam and LoRA stages' run."""
    cfg, folder, stage = ctx.config, ctx.folder, ctx.stage.name
    log_datasets(ctx.upstream["tokenize"]["outputs"]["spam"], "spam")
    result = fine_tune_classifier(ctx.prepared, folder, logger=ctx.logger)
    history, scores = result.training.history, result.scores
    metrics = {"steps": result.training.steps, "params/trainable": result.trainable_parameters,
               "params/total": result.total_parameters,
               "params/trainable_share": result.trainable_parameters / result.total_parameters}
    for split, prefix in METRIC_PREFIX.items():
        metrics.update({f"{prefix}_{name}": scores[split][name] for name in FINAL_METRICS})
    metrics["test_confusion"] = scores["test"]["confusion"]
    log_figure(plots.confusion_matrix(scores["test"]["confusion"], result.labels, f"{stage}: test set"),
               folder, "confusion_matrix.png")
    accuracies = {"train_accuracy": "Training accuracy", "val_accuracy": "Validation accuracy"}
    log_figure(plots.metric_curve(history, accuracies, "Accuracy", f"{stage}: accuracy per evaluation"),
               folder, "accuracy.png")
    log_figure(plots.metric_curve(history, {"train_loss": "Training loss", "val_loss": "Validation loss"},
                                  "Loss", f"{stage}: loss per evaluation"), folder, "loss.png")
    registered = log_model(result.model_dir, cfg.registered_name, ctx.profile.mlflow_config,
                           score=ModelScore("val_accuracy", scores["validation"]["accuracy"], "max"))
    outputs = {"model": str(result.model_dir), "model_sha256": sha256_file(result.model_dir / "model.safetensors"),
               "model_uri": registered.uri, "model_version": registered.version,
               "max_length": result.max_length, "precision": result.training.precision}
    if result.adapters_dir is not None:
        mlflow.log_artifacts(str(result.adapters_dir), artifact_path="adapters")
        outputs.update({"adapters": str(result.adapters_dir),
                        "adapters_sha256": sha256_file(result.adapters_dir / ADAPTERS_FILE)})
    return outputs, metrics


