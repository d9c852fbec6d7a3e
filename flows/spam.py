"""Spam stage: fine-tune a base model into an SMS spam classifier (the book's chapter 6).

The LoRA stage (flows/lora.py) runs the same recipe through `run_classifier`, with its own way
of choosing what trains and of exporting the result.
"""

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import torch
from prefect import flow
from torch import nn
from torch.utils.data import default_collate

from gpt_core import classifier
from gpt_core.batches import DatasetBatches
from gpt_core.distributed import pick_device
from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.lora import count_parameters
from gpt_core.tokenizer import get_tokenizer
from gpt_core.train import train
from gpt_core.weights import load_model, save_model

from . import plots
from .base_model import base_model_path, base_model_upstream
from .manifest import latest_manifest
from .pretrain import log_step_metrics
from .settings import Profile, SpamConfig
from .stage import cached_output, run_stage
from .tracking import log_model

LABELS = ["not spam", "spam"]
SPLITS = {"train": "train", "validation": "val", "test": "test"}  # tokenize's split name -> metric prefix
FINAL_METRICS = ("accuracy", "precision", "recall", "f1", "loss")

# make_trainable(model) chooses what trains once the head is in place; export(model, folder, info)
# runs after training, before the classifier is evaluated and saved, and returns extra outputs.
MakeTrainable = Callable[[nn.Module], None]
Export = Callable[[nn.Module, Path, dict], dict]


def spam_datasets(splits: dict, tokenizer, max_length: int | None) -> dict[str, classifier.SpamDataset]:
    """The tokenize stage's spam splits, padded to the longest training text (or `max_length`);
    validation and test are truncated to the same length, as the book does."""
    datasets = {}
    for split in SPLITS:  # train first: the others take its length
        path = splits[split]["path"]
        try:
            frame = pd.read_parquet(path)
        except OSError as err:
            raise GptflowError(f"cannot read the spam {split} split: {err}; "
                               "re-run `gptflow stage tokenize --force`") from None
        length = max_length if split == "train" else datasets["train"].max_length
        try:
            datasets[split] = classifier.SpamDataset(frame["text"], frame["label"], tokenizer, length)
        except GptflowError as err:
            raise GptflowError(f"spam {split} split {path}: {err}") from None
    return datasets


def classification_loss(model, inputs, targets):
    return classifier.calc_loss_batch(inputs, targets, model)


def run_classifier(stage: str, profile: Profile, cfg: SpamConfig, tokenize: dict | None, pretrain: dict | None,
                   force: bool, make_trainable: MakeTrainable, export: Export | None = None) -> dict:
    upstream = {"tokenize": tokenize or latest_manifest(profile.data_dir, "tokenize"),
                **base_model_upstream(profile, cfg.base_model, pretrain)}
    previous = cached_output(stage, profile, cfg, upstream, force)
    if previous is not None:  # reused: skip loading the model and data for the up-front checks
        return previous
    splits = upstream["tokenize"]["outputs"].get("spam")
    if splits is None:
        raise GptflowError("the tokenize stage prepared no spam splits: add sms-spam to download.sources, "
                           "then run the download and tokenize stages")
    # Device, data and base model are checked before the stage starts, so bad input fails up front.
    device = pick_device(cfg.device)
    tokenizer = get_tokenizer()
    datasets = spam_datasets(splits, tokenizer, cfg.max_length)
    max_length = datasets["train"].max_length
    model, _ = load_model(base_model_path(cfg.base_model, upstream), drop_rate=cfg.drop_rate)
    classifier.check_fits(max_length, model.cfg.context_length)

    def batches(split, train_order=False):
        # The book's loaders: training shuffles and drops the last partial batch.
        return DatasetBatches(datasets[split], cfg.batch_size, default_collate, shuffle=train_order,
                              drop_last=train_order, seed=cfg.seed)

    train_data = batches("train", train_order=True)
    eval_data = {split: batches(split) for split in SPLITS}
    # At least 1 so that train() gets to report an epoch shorter than grad_accum itself.
    steps_per_epoch = max(1, train_data.num_batches() // cfg.grad_accum)

    def body(folder, _upstream):
        torch.manual_seed(cfg.seed)  # the new head's (and LoRA's) initialisation
        classifier.add_classification_head(model, len(LABELS))
        make_trainable(model)
        trainable, total = count_parameters(model)

        def per_epoch(step, record):
            # Stored in the training history, so a resumed run still plots every epoch.
            record["epoch"] = math.ceil(step / steps_per_epoch)
            for prefix, source in (("train", train_data), ("val", eval_data["validation"])):
                record[f"{prefix}_accuracy"] = classifier.calc_accuracy(
                    source.batches(), model, num_batches=cfg.eval_batches)
            mlflow.log_metrics({f"epoch/{key}": record[key] for key in
                                ("train_loss", "val_loss", "train_accuracy", "val_accuracy")}, step=record["epoch"])

        # Accuracies once per epoch, as the book computes them; eval_every is not used here.
        settings = replace(cfg.train_settings(), eval_every=steps_per_epoch)
        info = {"num_classes": len(LABELS), "labels": LABELS, "max_length": max_length, "stage": stage,
                "tokenizer": "gpt2"}
        result = train(model, settings, train_data, eval_data["validation"], folder / "checkpoints",
                       loss_fn=classification_loss, device=device, log=log_step_metrics, on_eval=per_epoch,
                       best_extra=info)
        outputs = export(model, folder, info) if export else {}

        metrics = {"steps": result.steps, "params/trainable": trainable, "params/total": total,
                   "params/trainable_share": trainable / total}
        scores = {split: classifier.evaluate(model, data.batches()) for split, data in eval_data.items()}
        for split, prefix in SPLITS.items():
            metrics.update({f"{prefix}_{name}": scores[split][name] for name in FINAL_METRICS})
        metrics["test_confusion"] = scores["test"]["confusion"]
        _log_figure(folder, "confusion_matrix.png",
                    plots.confusion_matrix(scores["test"]["confusion"], LABELS, f"{stage}: test set"))
        _log_figure(folder, "accuracy.png", plots.metric_curve(
            result.history, {"train_accuracy": "Training accuracy", "val_accuracy": "Validation accuracy"},
            "Accuracy", f"{stage}: accuracy per epoch"))
        _log_figure(folder, "loss.png", plots.metric_curve(
            result.history, {"train_loss": "Training loss", "val_loss": "Validation loss"},
            "Loss", f"{stage}: loss per epoch"))

        model_dir = save_model(model, folder / "model", info)
        outputs.update({"model": str(model_dir), "model_sha256": sha256_file(model_dir / "model.safetensors"),
                        "model_uri": log_model(model_dir, cfg.registered_name, profile.mlflow_config),
                        "max_length": max_length, "precision": result.precision})
        return outputs, metrics

    return run_stage(stage, profile, cfg, upstream, body, force)


def _log_figure(folder: Path, name: str, fig):
    fig.savefig(folder / name, dpi=120)
    mlflow.log_figure(fig, name)
    plots.close(fig)


def run_spam(profile: Profile, tokenize: dict | None = None, pretrain: dict | None = None,
             force: bool = False) -> dict:
    cfg = profile.spam
    return run_classifier("spam", profile, cfg, tokenize, pretrain, force,
                          make_trainable=lambda model: classifier.set_trainable(model, cfg.trainable))


@flow(name="spam", log_prints=True)
def spam_flow(profile: Profile, tokenize: dict | None = None, pretrain: dict | None = None,
              force: bool = False) -> dict:
    return run_spam(profile, tokenize, pretrain, force)
