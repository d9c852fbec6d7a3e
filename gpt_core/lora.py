"""Low-rank adaptation (the book's appendix E), with an explicit merge as litgpt does it.

Each wrapped nn.Linear keeps its frozen weight and learns a low-rank update
scaling * (A @ B), with A: (in, rank) and B: (rank, out) as in the book's LoRALayer.
B starts at zero, so a freshly injected model computes exactly what the base model did.

Beyond the book, the token embedding can get an update of the same form (LoRAEmbedding): a
base model pretrained on a narrow corpus has near-untrained embeddings for a new task's
vocabulary, which adapting the linear layers cannot reach.
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import GptflowError
from .files import atomic_write_json
from .weights import save_tensors

TARGETS = ("all", "attention")
ATTENTION_LAYERS = ("att.qkv", "att.out_proj")
ADAPTERS_FILE = "adapters.safetensors"
ADAPTERS_CONFIG = "adapters.json"
FORMAT = "gptflow-lora"


class _LowRankUpdate(nn.Module):
    """scaling * (A @ B) with A: (rows, rank) Kaiming-uniform as in the book, B: (rank, cols) at zero."""

    def __init__(self, rows: int, cols: int, rank: int, alpha: float, like: torch.Tensor):
        super().__init__()
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = {"device": like.device, "dtype": like.dtype}
        self.lora_A = nn.Parameter(torch.empty(rows, rank, **factory))
        self.lora_B = nn.Parameter(torch.zeros(rank, cols, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.lora_A @ self.lora_B)


class LoRALinear(_LowRankUpdate):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__(linear.in_features, linear.out_features, rank, alpha, linear.weight)
        self.linear = linear

    def forward(self, x):
        return self.linear(x) + self.scaling * (x @ self.lora_A @ self.lora_B)


class LoRAEmbedding(_LowRankUpdate):
    """An embedding table plus scaling * (A @ B), A: (num_embeddings, rank), B: (rank, dim)."""

    def __init__(self, embedding: nn.Embedding, rank: int, alpha: float):
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, rank, alpha, embedding.weight)
        self.embedding = embedding

    def forward(self, idx):
        # Only the looked-up rows of A: the full (vocab x dim) update is never formed.
        return self.embedding(idx) + self.scaling * (F.embedding(idx, self.lora_A) @ self.lora_B)


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear | LoRAEmbedding)}


def _replace_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def inject_lora(model: nn.Module, rank: int, alpha: float, targets: str = "all",
                embedding_rank: int | None = None) -> int:
    """Wrap the targeted nn.Linear layers in LoRALinear and freeze everything else.

    "all" wraps every nn.Linear, output or classification head included, as the book does;
    "attention" only each block's att.qkv and att.out_proj. With `embedding_rank`, the token
    embedding gets a LoRAEmbedding of that rank (same alpha) too. Returns how many were wrapped.
    """
    if targets not in TARGETS:
        raise GptflowError(f"LoRA targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    if rank < 1 or (embedding_rank is not None and embedding_rank < 1):
        raise GptflowError(f"LoRA ranks must be positive, got {rank} and embedding rank {embedding_rank}")
    if _lora_modules(model):
        raise GptflowError("the model already has LoRA adapters; merge them or start from the base model")
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and (targets == "all" or name.endswith(ATTENTION_LAYERS))]
    for param in model.parameters():
        param.requires_grad = False
    # A tied out_head stays tied: the wrapper holds the very same nn.Linear, whose weight
    # Parameter is tok_emb.weight.
    for name in names:
        _replace_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    if embedding_rank is not None:
        model.tok_emb = LoRAEmbedding(model.tok_emb, embedding_rank, alpha)
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": targets, "embedding_rank": embedding_rank}
    return len(names) + (embedding_rank is not None)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the adapters add to the base model, under the model's own state_dict names.

    The LoRA matrices, every other trainable parameter (e.g. an unfrozen new head) and, for a
    classifier (model.num_classes set), its head: a fresh head is no part of the base weights,
    even when frozen as in the book's appendix E, so it has to travel with the adapters.
    """
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = {id(p) for p in model.out_head.parameters()} if getattr(model, "num_classes", None) else set()
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
    if not _lora_modules(model):
        raise GptflowError("the model has no LoRA adapters to save")
    folder = Path(folder)
    save_tensors(lora_state_dict(model), folder / ADAPTERS_FILE)
    # The caller's keys go first so they cannot overwrite what load_adapters relies on.
    config = {**(extra_config or {}), "format": FORMAT, **model.lora_config, "model": model.cfg.to_dict(),
              "num_classes": getattr(model, "num_classes", None)}
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
    num_classes = getattr(model, "num_classes", None)
    if config.get("num_classes") != num_classes:
        raise GptflowError(
            f"adapters in {folder} are for a model with num_classes={config.get('num_classes')}, "
            f"this one has {num_classes}; add the classification head first")
    settings = {key: config.get(key) for key in ("rank", "alpha", "targets", "embedding_rank")}
    if not _lora_modules(model):
        inject_lora(model, **settings)
    elif model.lora_config != settings:
        raise GptflowError(f"adapters in {folder} were trained with {settings}, the model has {model.lora_config}")
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
        for name, lora in _lora_modules(model).items():
            if isinstance(lora, LoRALinear):
                untie(lora.linear)
                lora.linear.weight += lora.delta().T
                _replace_module(model, name, lora.linear)
            else:
                untie(lora.embedding)
                lora.embedding.weight += lora.delta()
                _replace_module(model, name, lora.embedding)
    if hasattr(model, "lora_config"):
        del model.lora_config
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
