"""Classification fine-tuning (the book's chapter 6 and, with LoRA, appendix E).

A pretrained model gets a fresh classification head and learns one of three ways: every weight,
the book's last block + final norm + head, or low-rank adapters (LoRA) on the linear layers.
With LoRA the new head trains too, unlike in the book, which leaves its random weights frozen
behind an adapter: it is new, not pretrained, so there is nothing to preserve, and it adds only
emb_dim x classes parameters. After training the adapters are saved on their own, then merged,
so the model folder is a plain classifier.

Accuracies are computed at every evaluation, which is once per epoch unless eval_every says
otherwise, as the book computes them.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import default_collate

from .. import classifier
from ..batches import DatasetBatches
from ..distributed import pick_device
from ..errors import GptflowError
from ..lora import (
    LoraSettings,
    count_parameters,
    inject_lora,
    merge_lora,
    save_adapters,
)
from ..metrics import TRAIN_ACCURACY, VAL_ACCURACY
from ..model import GPTModel
from ..settings import setting
from ..tokenizer import get_tokenizer
from ..tracking import MetricLogger
from ..train import TrainResult, TrainSettings, steps_per_epoch, train
from ..weights import load_model, save_model

SPLITS = ("train", "validation", "test")
SPAM_LABELS = ("not spam", "spam")


@dataclass(frozen=True)
class ClassifierTraining(TrainSettings):
    """What every way of fine-tuning a classifier shares."""

    max_length: int | None = setting(None, gt=0, doc="pad/truncate length; none: the longest training text")
    drop_rate: float = setting(0.0, ge=0, lt=1, doc="dropout while fine-tuning")
    epochs: int = setting(5, gt=0, doc="passes over the training split")
    lr: float = setting(5e-5, gt=0, doc="peak learning rate")
    eval_every: int | None = setting(None, gt=0, doc="optimizer steps between evaluations; none: once per "
                                                     "epoch, as the book")


@dataclass(frozen=True)
class ClassifierSettings(ClassifierTraining):
    """Fine-tuning selected layers: the book's last_block, every weight, or the head alone."""

    trainable: classifier.Trainable = setting("last_block", doc="last_block: the book's last block, final "
                                                                "norm and head; all; head")


@dataclass(frozen=True)
class LoraClassifierSettings(ClassifierTraining, LoraSettings):
    """Fine-tuning through LoRA adapters (plus the new head)."""

    lr: float = setting(8e-4, gt=0, doc="peak learning rate")


@dataclass
class PreparedClassifier:
    """Everything checked and loaded before training starts: bad input fails here, before any
    output is written."""

    model: GPTModel
    settings: ClassifierSettings | LoraClassifierSettings
    data: dict[str, classifier.SpamDataset]
    labels: list[str]
    device: torch.device

    @property
    def max_length(self) -> int:
        return self.data["train"].max_length


@dataclass
class ClassifierResult:
    model: GPTModel
    training: TrainResult
    scores: dict[str, dict]  # split -> loss, accuracy, precision, recall, f1, confusion
    model_dir: Path
    adapters_dir: Path | None
    max_length: int
    labels: list[str]
    trainable_parameters: int
    total_parameters: int


def datasets(splits: Mapping[str, pd.DataFrame], max_length: int | None) -> dict[str, classifier.SpamDataset]:
    """One SpamDataset per split (frames with columns text and label), padded to the longest
    training text (or `max_length`); validation and test are cut to the same length, as the book does."""
    tokenizer = get_tokenizer()
    out = {}
    for split in SPLITS:  # train first: the others take its length
        if split not in splits:
            raise GptflowError(f"the classifier data has no {split} split")
        length = max_length if split == "train" else out["train"].max_length
        try:
            out[split] = classifier.SpamDataset(splits[split]["text"], splits[split]["label"], tokenizer, length)
        except GptflowError as err:
            raise GptflowError(f"{split} split: {err}") from None
    return out


def prepare_classifier(base_model: str | Path, settings: ClassifierSettings | LoraClassifierSettings,
                       splits: Mapping[str, pd.DataFrame], labels: Sequence[str] = SPAM_LABELS) -> PreparedClassifier:
    """Check the device, encode `splits` (frames with columns text and label) and load `base_model`
    (a model folder or OpenAI preset), checking that the padded texts fit its context."""
    device = pick_device(settings.device)
    data = datasets(splits, settings.max_length)
    model, _ = load_model(base_model, drop_rate=settings.drop_rate)
    classifier.check_fits(data["train"].max_length, model.cfg.context_length)
    return PreparedClassifier(model, settings, data, list(labels), device)


def fine_tune_classifier(prepared: PreparedClassifier, out_dir: str | Path, *, logger: MetricLogger | None = None,
                         progress: bool = True) -> ClassifierResult:
    """Fine-tune the prepared base model into a classifier in `out_dir` (checkpoints/,
    checkpoints/best/, model/, and adapters/ with LoRA)."""
    out_dir = Path(out_dir)
    model, settings, data, labels, device = (prepared.model, prepared.settings, prepared.data, prepared.labels,
                                             prepared.device)
    max_length = prepared.max_length
    info = {"labels": labels, "max_length": max_length, "tokenizer": "gpt2", "recipe": "classifier"}

    torch.manual_seed(settings.seed)  # the new head's (and LoRA's) initialisation
    classifier.add_classification_head(model, len(labels))
    lora = isinstance(settings, LoraSettings)
    if lora:
        inject_lora(model, settings)
        classifier.head_layer(model).requires_grad_(True)
    else:
        classifier.set_trainable(model, settings.trainable)
    trainable, total = count_parameters(model)

    def batches(split, train_order=False):
        # The book's loaders: training shuffles and drops the last partial batch.
        return DatasetBatches(data[split], settings.batch_size, default_collate, shuffle=train_order,
                              drop_last=train_order, seed=settings.seed)

    train_data = batches("train", train_order=True)
    eval_data = {split: batches(split) for split in SPLITS}
    epoch_steps = steps_per_epoch(settings, train_data)

    def accuracies(step, record):
        # Stored in the training history, so a resumed run still plots every evaluation.
        record["epoch"] = step / epoch_steps
        for prefix, source in (("train", train_data), ("val", eval_data["validation"])):
            record[f"{prefix}_accuracy"] = classifier.calc_accuracy(source.batches(), model,
                                                                    num_batches=settings.eval_batches)
        if logger:
            logger.log_metrics({TRAIN_ACCURACY: record["train_accuracy"], VAL_ACCURACY: record["val_accuracy"]}, step)

    result = train(model, settings, train_data, eval_data["validation"], out_dir / "checkpoints",
                   loss_fn=classifier.classification_loss, device=device, logger=logger, on_eval=accuracies,
                   on_best=lambda step, record: save_model(model, out_dir / "checkpoints" / "best", info),
                   progress=progress)
    adapters_dir = None
    if lora:
        adapters_dir = save_adapters(model, out_dir / "adapters", info)
        merge_lora(model)
    scores = {split: classifier.classification_metrics(model, source.batches()) for split, source in eval_data.items()}
    model_dir = save_model(model, out_dir / "model", info)
    return ClassifierResult(model=model, training=result, scores=scores, model_dir=model_dir,
                            adapters_dir=adapters_dir, max_length=max_length, labels=labels,
                            trainable_parameters=trainable, total_parameters=total)
