"""Model weights on disk: our own format and OpenAI GPT-2 checkpoints in Hugging Face format.

Our format is a folder with `model.safetensors` and a `config.json` holding the model config,
output head included (`num_classes` for a classifier), and whatever the writer adds beside it
(a classifier's labels, an instruction model's prompt style). Nothing is pickled.
"""

import json
import logging
import os
import re
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PRESETS, ModelConfig
from .download import fetch_url, mirror_url
from .errors import GptflowError
from .files import atomic_output, atomic_write_json
from .hub import fetch_repo_files, hub_constants
from .model import GPTModel
from .packed import pack_linear_weights
from .precision import resolve_precision
from .prompts import STYLES

FORMAT = "gptflow"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

log = logging.getLogger("gptflow")

# Hugging Face repositories where OpenAI publishes GPT-2 as safetensors.
OPENAI_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    with atomic_output(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
        except SafetensorError as err:
            # safetensors reports a failed write as its own error; an OSError keeps what the
            # machine said (a full disk is not a bug), as every other writer's does.
            code = re.search(r"\(os error (\d+)\)", str(err))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from err


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without the tied output head (safetensors stores no shared tensors).

    The head may sit under another name once wrapped (LoRA's out_head.linear.weight), so ties
    are found by storage, not by name.
    """
    state = model.state_dict()
    # LoRA may wrap the embedding too (tok_emb.embedding.weight).
    key = next((k for k in ("tok_emb.weight", "tok_emb.embedding.weight") if k in state), None)
    if key is None:
        return state
    embedding = state[key]
    return {name: tensor for name, tensor in state.items()
            if name == key or tensor.data_ptr() != embedding.data_ptr()}


def save_model(model: GPTModel, folder: str | Path, extra: dict | None = None) -> Path:
    """Write `model` as safetensors + config.json; `extra` goes into config.json beside it."""
    folder = Path(folder)
    save_tensors(model_state(model), folder / WEIGHTS_FILE)
    atomic_write_json(folder / CONFIG_FILE, {"format": FORMAT, "model": model.cfg.to_dict(), **(extra or {})})
    return folder


ModelKind = Literal["language-model", "classifier", "instruct"]


def model_kind(config: dict) -> ModelKind:
    """What a model folder's config.json (`read_config`) says the model does: a classifier has a
    class head, an instruction model was fine-tuned by the instruct recipe (it has a prompt
    style), and anything else, a Hugging Face GPT-2 folder included, is a language model."""
    if (config.get("model") or {}).get("num_classes") or config.get("num_classes"):
        return "classifier"
    if config.get("recipe") == "instruct" or "style" in config:
        return "instruct"
    return "language-model"


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise GptflowError(f"cannot read model config {path}: {err}") from None
    if not isinstance(config, dict):
        raise GptflowError(f"model config {path} must be a JSON object, got a {type(config).__name__}")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise GptflowError(f"no weights file at {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise GptflowError(f"cannot read weights {path}: {err}") from None


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str):
    """Copy `state` into `model`, failing with the first missing, extra or misshapen tensor."""
    expected = model_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise GptflowError(
            f"weights in {source} do not fit the model: "
            + (f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"))
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise GptflowError(
                f"weights in {source} do not fit the model: {name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False)


def hf_config_to_model_config(hf: dict) -> ModelConfig:
    if hf.get("model_type") != "gpt2":
        raise GptflowError(f"expected a GPT-2 config (model_type 'gpt2'), got {hf.get('model_type')!r}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], context_length=hf["n_positions"], emb_dim=hf["n_embd"],
        n_heads=hf["n_head"], n_layers=hf["n_layer"], drop_rate=0.0, qkv_bias=True,
        tie_weights=hf.get("tie_word_embeddings", True))


def hf_to_state(hf_state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename GPT-2's tensors to ours; GPT-2's Conv1D stores weights as (in, out)."""
    hf_state = {k.removeprefix("transformer."): v for k, v in hf_state.items()}
    renames = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight",
               "ln_f.weight": "final_norm.weight", "ln_f.bias": "final_norm.bias"}
    per_block = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "att.qkv",
                 "attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}
    transposed = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    state = {}
    for name, tensor in hf_state.items():
        if name in renames:
            state[renames[name]] = tensor
        elif name.startswith("h."):
            _, index, rest = name.split(".", 2)
            module, _, kind = rest.rpartition(".")
            if module not in per_block:
                continue  # the attention-mask buffers older checkpoints carry
            if module in transposed and kind == "weight":
                tensor = tensor.t()
            state[f"trf_blocks.{index}.{per_block[module]}.{kind}"] = tensor
        elif name == "lm_head.weight" and not cfg.tie_weights:
            state["out_head.weight"] = tensor
    if not cfg.tie_weights and "out_head.weight" not in state and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    return state


def _openai_folder(preset: str) -> Path:
    """A folder with the preset's config.json and weights: GPTFLOW_MIRROR's copy when it has one
    (under `openai-community/<repo>/`), else the Hugging Face cache, downloading on first use."""
    repo = OPENAI_REPOS[preset]
    files = (CONFIG_FILE, WEIGHTS_FILE)
    mirror = os.environ.get("GPTFLOW_MIRROR")
    if mirror and "://" not in mirror and all((Path(mirror) / repo / file).is_file() for file in files):
        return Path(mirror) / repo
    if mirror and "://" in mirror:
        folder = Path(hub_constants().HF_HOME) / "gptflow-mirror" / repo
        try:
            for file in files:
                fetch_url(mirror_url(mirror, f"{repo}/{file}"), folder / file, None, label=f"{preset} {file}")
            return folder
        except GptflowError as err:
            log.info("%s not on the mirror (%s); trying the Hugging Face Hub", preset, err)
    return fetch_repo_files(repo, files)


def resolve_model_path(spec: str) -> Path:
    """A local model folder for `spec`: a folder, or an OpenAI preset downloaded on first use."""
    path = Path(spec)
    if path.is_dir():
        return path
    if spec in OPENAI_REPOS:
        return _openai_folder(spec)
    if spec in PRESETS:
        raise GptflowError(f"'{spec}' is a model shape without published weights; train one or pass a model folder")
    raise GptflowError(
        f"no model at '{spec}': expected a model folder (config.json + model.safetensors) "
        f"or an OpenAI GPT-2 preset ({', '.join(OPENAI_REPOS)})")


def load_model(spec: str | Path, device="cpu", **overrides) -> tuple[GPTModel, dict]:
    """Load a model folder (ours or Hugging Face GPT-2) or an OpenAI preset.

    Returns the model and the folder's config.json (so callers can read what else was saved).
    `overrides` replace model-config fields, e.g. drop_rate for fine-tuning. The model config
    describes the output head, so a classifier comes back with its classification head.
    """
    folder = resolve_model_path(str(spec))
    config = read_config(folder)
    tensors = _read_tensors(folder / WEIGHTS_FILE)
    if config.get("format") == FORMAT:
        described = dict(config["model"])
        if config.get("num_classes"):  # folders written before the head moved into the model config
            described["num_classes"] = config["num_classes"]
        cfg = ModelConfig.from_dict({**described, **overrides})
        state = tensors
    else:
        try:
            cfg = hf_config_to_model_config(config)
        except KeyError as err:
            raise GptflowError(f"{folder / CONFIG_FILE} lacks GPT-2 config key {err}") from None
        cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
        state = hf_to_state(tensors, cfg)
    model = GPTModel(cfg)
    load_state(model, state, str(folder))
    return model.to(device), config


def load_language_model(spec: str | Path, device="cpu", precision: str = "auto") -> tuple[GPTModel, dict, Path]:
    """(model in eval mode, config.json, folder) for a model that generates text; a one-line
    error for a classifier, whose head answers classes, not tokens.

    precision auto stores the weights in bf16 where the device runs it natively: decoding streams
    every weight once per token, and half the bytes is 2.3x fp32's speed on the team's CPU (and
    1.1x bf16 autocast, which re-casts each weight on every call). On the CPU the linear weights
    are then packed for oneDNN once (gpt_core.packed), 1.7x again.
    """
    folder = resolve_model_path(str(spec))
    model, config = load_model(folder, device=device)
    if resolve_precision(device, precision) == "bf16":
        model = model.to(torch.bfloat16)
    pack_linear_weights(model)
    if model.cfg.num_classes:
        raise GptflowError(f"{spec} is a classifier ({model.cfg.num_classes} classes), not a language "
                           "model: this needs one that generates text, such as the instruct stage's model "
                           "or a pretrained one")
    style = config.get("style")
    if style is not None and style not in STYLES:
        raise GptflowError(f"{folder / CONFIG_FILE} names prompt style {style!r}; known: {', '.join(STYLES)}")
    return model.eval(), config, folder
