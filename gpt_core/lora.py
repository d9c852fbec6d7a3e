"""Low-rank adaptation (the book's appendix E), with an explicit merge as litgpt does it.

Each wrapped nn.Linear keeps its frozen weight and learns a low-rank update
scale * (A @ B), with A: (in, rank) and B: (rank, out) as in the book's LoRALayer.
B starts at zero, so a freshly injected model computes exactly what the base model did.
The scale is alpha / rank by default (the LoRA paper's and PEFT's convention); the book's
LoRALayer multiplies by alpha itself, which `scaling="book"` reproduces.

Beyond the book, the token embedding can get an update of the same form (LoRAEmbedding): a
base model pretrained on a narrow corpus has near-untrained embeddings for a new task's
vocabulary, which adapting the linear layers cannot reach.
"""

import json
import math
import typing
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import GptflowError
from .files import atomic_write_json
from .settings import Settings, setting
from .weights import save_tensors

Targets = Literal["all", "attention"]
TARGETS = typing.get_args(Targets)
Scaling = Literal["standard", "book"]
ATTENTION_LAYERS = ("att.qkv", "att.out_proj")
ADAPTERS_FILE = "adapters.safetensors"
ADAPTERS_CONFIG = "adapters.json"
FORMAT = "gptflow-lora"


@dataclass(frozen=True)
class LoraSettings(Settings):
    rank: int = setting(16, gt=0, doc="rank of each adapted layer's update")
    alpha: float = setting(16.0, gt=0, doc="the update's scale: alpha / rank, or alpha itself with scaling: book")
    scaling: Scaling = setting("standard", doc="standard: the update is scaled by alpha / rank (the LoRA paper, "
                                               "PEFT); book: by alpha, as the book's LoRALayer does")
    targets: Targets = setting("all", doc="all: every linear layer, heads included; attention: att.qkv and "
                                          "att.out_proj of each block")
    embedding_rank: int | None = setting(None, gt=0, doc="also adapt the token embedding, at this rank (not "
                                                         "in the book; for a base model that never saw the "
                                                         "task's vocabulary)")


class _LowRankUpdate(nn.Module):
    """scale * (A @ B) with A: (rows, rank) Kaiming-uniform as in the book, B: (rank, cols) at zero."""

    def __init__(self, rows: int, cols: int, rank: int, alpha: float, scaling: Scaling, like: torch.Tensor):
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.scaling = scaling
        self.scale = alpha if scaling == "book" else alpha / rank
        factory = {"device": like.device, "dtype": like.dtype}
        self.lora_A = nn.Parameter(torch.empty(rows, rank, **factory))
        self.lora_B = nn.Parameter(torch.zeros(rank, cols, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.lora_A @ self.lora_B)


class LoRALinear(_LowRankUpdate):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float, scaling: Scaling = "standard"):
        super().__init__(linear.in_features, linear.out_features, rank, alpha, scaling, linear.weight)
        self.linear = linear

    def forward(self, x):
        return self.linear(x) + self.scale * (x @ self.lora_A @ self.lora_B)


class LoRAEmbedding(_LowRankUpdate):
    """An embedding table plus scale * (A @ B), A: (num_embeddings, rank), B: (rank, dim)."""

    def __init__(self, embedding: nn.Embedding, rank: int, alpha: float, scaling: Scaling = "standard"):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, rank, alpha, scaling, embedding.weight)
        self.embedding = embedding

    def forward(self, idx):
        # Only the looked-up rows of A: the full (vocab x dim) update is never formed.
        return self.embedding(idx) + self.scale * (F.embedding(idx, self.lora_A) @ self.lora_B)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear | LoRAEmbedding)}


def _replace_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def inject_lora(model: nn.Module, settings: LoraSettings) -> int:
    """Wrap the targeted nn.Linear layers in LoRALinear and freeze everything else.

    "all" wraps every nn.Linear, output or classification head included, as the book does;
    "attention" only each block's att.qkv and att.out_proj. With `embedding_rank`, the token
    embedding gets a LoRAEmbedding of that rank (same alpha) too. Returns how many were wrapped.
    """
    if lora_modules(model):
        raise GptflowError("the model already has LoRA adapters; merge them or start from the base model")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and (settings.targets == "all" or name.endswith(ATTENTION_LAYERS))]
    for param in model.parameters():
        param.requires_grad = False
    # A tied out_head stays tied: the wrapper holds the very same nn.Linear, whose weight
    # Parameter is tok_emb.weight.
    for name in names:
        _replace_module(model, name, LoRALinear(model.get_submodule(name), settings.rank, settings.alpha,
                                                  settings.scaling))
    if settings.embedding_rank is not None:
        model.tok_emb = LoRAEmbedding(model.tok_emb, settings.embedding_rank, settings.alpha, settings.scaling)
    return len(names) + (settings.embedding_rank is not None)


def lora_settings(model: nn.Module) -> LoraSettings | None:
    """The settings the model's adapters were injected with, read from the adapters themselves."""
    modules = lora_modules(model)
    linears = [m for m in modules.values() if isinstance(m, LoRALinear)]
    if not linears:
        return None
    embedding = getattr(model, "tok_emb", None)
    wrapped_all = any(not name.endswith(ATTENTION_LAYERS) for name, m in modules.items() if isinstance(m, LoRALinear))
    return LoraSettings(rank=linears[0].rank, alpha=linears[0].alpha, scaling=linears[0].scaling,
                        targets="all" if wrapped_all else "attention",
                        embedding_rank=embedding.rank if isinstance(embedding, LoRAEmbedding) else None)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the adapters add to the base model, under the model's own state_dict names.

    The LoRA matrices, every other trainable parameter (e.g. an unfrozen new head) and, for a
    classifier (a `num_classes` head), its head: a fresh head is no part of the base weights,
    even when frozen as in the book's appendix E, so it has to travel with the adapters.
    """
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = {id(p) for p in model.out_head.parameters()} if model.cfg.num_classes else set()
    return {name: p.detach().clone() for name, p in model.named_parameters()
            if ".lora_" in name or id(p) in trainable or id(p) in head}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]):
    """Copy adapter tensors into a LoRA-injected model; every LoRA tensor must be present."""
    params = dict(model.named_parameters())
    missing = sorted(name for name in params if ".lora_" in name and name not in state)
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise GptflowError(
            "adapters do not fit the model: "
            + (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"))
    for name, tensor in state.items():
        if tensor.shape != params[name].shape:
            raise GptflowError(
                f"adapters do not fit the model: {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def save_adapters(model: nn.Module, folder: str | Path, extra_config: dict | None = None) -> Path:
    """Write adapters.safetensors and adapters.json (LoRA settings, base model, `extra_config`)."""
    if not lora_modules(model):
        raise GptflowError("the model has no LoRA adapters to save")
    folder = Path(folder)
    save_tensors(lora_state_dict(model), folder / ADAPTERS_FILE)
    # The caller's keys go first so they cannot overwrite what load_adapters relies on.
    config = {**(extra_config or {}), "format": FORMAT, **asdict(lora_settings(model)), "model": model.cfg.to_dict()}
    atomic_write_json(folder / ADAPTERS_CONFIG, config)
    return folder


def load_adapters(model: nn.Module, folder: str | Path) -> dict:
    """Load saved adapters into `model`, injecting LoRA first if it has none yet.

    A classifier's head must already be in place (classifier.add_classification_head).
    Returns adapters.json.
    """
    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTERS_CONFIG).read_text())
        state = load_file(str(folder / ADAPTERS_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as err:
        raise GptflowError(f"cannot read LoRA adapters in {folder}: {err}") from None
    if config.get("format") != FORMAT:
        raise GptflowError(f"{folder / ADAPTERS_CONFIG} is not a gptflow LoRA adapter config")
    saved = config.get("model", {}).get("num_classes", config.get("num_classes"))
    if saved != model.cfg.num_classes:
        raise GptflowError(
            f"adapters in {folder} are for a model with num_classes={saved}, "
            f"this one has {model.cfg.num_classes}; add the classification head first")
    # Adapters saved before `scaling` existed were all trained with alpha / rank.
    settings = LoraSettings(scaling=config.get("scaling", "standard"),
                            **{key: config[key] for key in ("rank", "alpha", "targets", "embedding_rank")})
    present = lora_settings(model)
    if present is None:
        inject_lora(model, settings)
    elif present != settings:
        raise GptflowError(f"adapters in {folder} were trained with {settings}, the model has {present}")
    load_lora_state(model, state)
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and unwrap it, in place.

    The result is a plain GPTModel that weights.save_model can write. A tied output head and
    token embedding are untied first: one's update must not leak into the other.
    """
    def untie(module: nn.Module):
        if module.weight is _shared_weight(model):
            module.weight = nn.Parameter(module.weight.clone(), requires_grad=module.weight.requires_grad)
            model.cfg = replace(model.cfg, tie_weights=False)

    with torch.no_grad():
        for name, lora in lora_modules(model).items():
            if isinstance(lora, LoRALinear):
                untie(lora.linear)
                lora.linear.weight += lora.delta().T
                _replace_module(model, name, lora.linear)
            else:
                untie(lora.embedding)
                lora.embedding.weight += lora.delta()
                _replace_module(model, name, lora.embedding)
    return model


def _shared_weight(model: nn.Module) -> nn.Parameter | None:
    """The token embedding's weight while the output head shares it, else None."""
    embedding = getattr(model.tok_emb, "embedding", model.tok_emb)
    head = getattr(model.out_head, "linear", model.out_head)
    return embedding.weight if head.weight is embedding.weight else None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
