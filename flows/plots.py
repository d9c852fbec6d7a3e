"""Figures logged to MLflow. matplotlib's Agg backend: no display needed."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def loss_curve(history: list[dict], title: str = "Loss"):
    """Training and validation loss against tokens seen, as the book's plot_losses draws them."""
    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [h["tokens_seen"] for h in history]
    ax.plot(tokens, [h["train_loss"] for h in history], label="Training loss")
    if any("val_loss" in h for h in history):
        ax.plot(tokens, [h.get("val_loss") for h in history], linestyle="-.", label="Validation loss")
    ax.set_xlabel("Tokens seen")
    ax.set_ylabel("Loss")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def metric_curve(history: list[dict], keys: dict[str, str], ylabel: str, title: str):
    """Several per-epoch metrics (e.g. train and validation accuracy) on one axis."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in keys.items():
        ax.plot([h["epoch"] for h in history], [h[key] for h in history], marker="o", label=label)
    ax.set_xlabel("Epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def confusion_matrix(confusion: list[list[int]], labels: list[str], title: str = "Confusion matrix"):
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(confusion, cmap="Blues")
    for i, row in enumerate(confusion):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def histogram(values: list[float], bins: int, xlabel: str, title: str):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=bins)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Count")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def close(fig):
    plt.close(fig)
