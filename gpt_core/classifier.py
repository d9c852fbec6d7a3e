"""Classification fine-tuning (the book's chapter 6): a small head on GPTModel, spam data, metrics.

Like the book, texts are padded on the right and the class is read from the last position,
even when that position is padding. Under causal attention the last position still sees the
whole text before it, and the book's accuracies were obtained this way, so we keep it.
"""

import numbers
import typing
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .errors import GptflowError
from .lora import LoRALinear
from .model import GPTModel
from .tokenizer import END_OF_TEXT_ID, encode_literal

Trainable = Literal["last_block", "all", "head"]
TRAINABLE = typing.get_args(Trainable)
LABEL_NAMES = {"ham": 0, "spam": 1}


def add_classification_head(model: GPTModel, num_classes: int = 2) -> GPTModel:
    """Replace the vocabulary head by nn.Linear(emb_dim, num_classes), in place."""
    if num_classes < 2:
        raise GptflowError(f"a classifier needs at least 2 classes, got {num_classes}")
    return model.replace_head(num_classes)


def head_layer(model: GPTModel) -> nn.Linear:
    """The output head's nn.Linear, also when a LoRA adapter wraps it."""
    head = model.out_head
    return head.linear if isinstance(head, LoRALinear) else head


def set_trainable(model: nn.Module, which: Trainable):
    """"last_block": the book's choice (last block, final norm, head); "all"; or "head" only."""
    if which not in TRAINABLE:
        raise GptflowError(f"trainable layers must be one of {', '.join(TRAINABLE)}, got {which!r}")
    for param in model.parameters():
        param.requires_grad = which == "all"
    parts = {"last_block": (model.trf_blocks[-1], model.final_norm, model.out_head),
             "head": (model.out_head,), "all": ()}[which]
    for part in parts:
        for param in part.parameters():
            param.requires_grad = True


def _label(value, row: int) -> int:
    if isinstance(value, str) and value.strip().lower() in LABEL_NAMES:
        return LABEL_NAMES[value.strip().lower()]
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return int(value)
    raise GptflowError(f"row {row}: label {value!r} is not 0/1 or ham/spam")


class SpamDataset(Dataset):
    """The book's SpamDataset over in-memory texts and labels (0/1 or "ham"/"spam").

    Every text is truncated to max_length tokens and padded on the right with pad_token_id;
    max_length=None means the longest text here (pass the training set's to the others).
    Rows are numbered from 0 in error messages.
    """

    def __init__(self, texts, labels, tokenizer, max_length: int | None = None,
                 pad_token_id: int = END_OF_TEXT_ID):
        texts, labels = list(texts), list(labels)
        if len(texts) != len(labels):
            raise GptflowError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            raise GptflowError("the dataset has no texts")
        if max_length is not None and max_length < 1:
            raise GptflowError(f"max_length must be positive, got {max_length}")
        encoded = []
        for row, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise GptflowError(f"row {row}: the text is empty")
            # SMS texts are data: a literal "<|endoftext|>" in one is ordinary characters.
            encoded.append(encode_literal(tokenizer, text))
        self.labels = [_label(value, row) for row, value in enumerate(labels)]
        self.max_length = max_length or max(len(ids) for ids in encoded)
        self.encoded = [_pad(ids, self.max_length, pad_token_id) for ids in encoded]

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, index):
        return (torch.tensor(self.encoded[index], dtype=torch.long),
                torch.tensor(self.labels[index], dtype=torch.long))


def _pad(ids: list[int], max_length: int, pad_token_id: int) -> list[int]:
    ids = ids[:max_length]
    return ids + [pad_token_id] * (max_length - len(ids))


def check_fits(max_length: int, context_length: int):
    if max_length > context_length:
        raise GptflowError(
            f"padded length {max_length} exceeds the model's context of {context_length}; "
            f"set max_length to at most {context_length} to truncate longer texts")


def classify_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits at the last position, padding or not (see the module docstring)."""
    return model(input_ids)[:, -1, :]


def _device(model: nn.Module):
    return next(model.parameters()).device


def classification_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the last position's class logits: the book's calc_loss_batch, in the
    (model, inputs, targets) form every training loss here takes."""
    device = _device(model)
    return F.cross_entropy(classify_logits(model, inputs.to(device)), targets.to(device))


def _predict(model, loader, device, num_batches):
    """Mean batch loss (as the book's calc_loss_loader), targets, predictions and the number
    of classes, in eval mode."""
    was_training = model.training
    model.eval()
    losses, targets, predictions = [], [], []
    with torch.no_grad():
        for i, (input_batch, target_batch) in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            target_batch = target_batch.to(device)
            logits = classify_logits(model, input_batch.to(device))
            losses.append(F.cross_entropy(logits, target_batch).item())
            targets.append(target_batch)
            predictions.append(logits.argmax(dim=-1))
    model.train(was_training)
    if not losses:
        raise GptflowError("the data loader yielded no batches")
    return sum(losses) / len(losses), torch.cat(targets), torch.cat(predictions), logits.size(-1)


def calc_accuracy(loader, model: nn.Module, device=None, num_batches: int | None = None) -> float:
    """The book's calc_accuracy_loader: share of correct predictions over the first num_batches."""
    _, targets, predictions, _ = _predict(model, loader, device or _device(model), num_batches)
    return (targets == predictions).float().mean().item()


def metrics_from_confusion(confusion: list[list[int]]) -> dict:
    """Accuracy, and precision/recall/F1 of class 1 (spam), from confusion[true][predicted]."""
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(confusion)))
    true_pos = confusion[1][1]
    predicted_pos = sum(row[1] for row in confusion)
    actual_pos = sum(confusion[1])
    precision = true_pos / predicted_pos if predicted_pos else 0.0
    recall = true_pos / actual_pos if actual_pos else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": correct / total if total else 0.0,
            "precision": precision, "recall": recall, "f1": f1}


def classification_metrics(model: nn.Module, loader, device=None, num_batches: int | None = None) -> dict:
    """loss, accuracy, precision, recall, f1 and confusion[true][predicted] over the loader."""
    loss, targets, predictions, n = _predict(model, loader, device or _device(model), num_batches)
    counts = torch.bincount(targets.cpu() * n + predictions.cpu(), minlength=n * n)
    confusion = counts.view(n, n).tolist()
    return {"loss": loss, **metrics_from_confusion(confusion), "confusion": confusion}


def classify_text(model: nn.Module, tokenizer, text: str, max_length: int,
                  labels=("not spam", "spam"), pad_token_id: int = END_OF_TEXT_ID) -> tuple[str, float]:
    """(label, probability) for one text, padded and truncated as SpamDataset does."""
    if not text.strip():
        raise GptflowError("nothing to classify: the text is empty")
    check_fits(max_length, model.cfg.context_length)
    ids = _pad(encode_literal(tokenizer, text), max_length, pad_token_id)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = classify_logits(model, torch.tensor([ids], device=_device(model)))
    model.train(was_training)
    if len(labels) != logits.size(-1):
        raise GptflowError(f"{len(labels)} labels given for a head with {logits.size(-1)} classes")
    probs = torch.softmax(logits[0].float(), dim=-1)
    index = int(probs.argmax())
    return labels[index], probs[index].item()
