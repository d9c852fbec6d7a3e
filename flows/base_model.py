"""Which model a fine-tuning stage starts from: the pretrain stage's output or a named one."""

from pathlib import Path

from .manifest import latest_manifest
from .settings import Profile

PRETRAIN = "pretrain"


def base_model_upstream(profile: Profile, base_model: str, pretrain: dict | None) -> dict[str, dict]:
    """Upstream manifests of a fine-tuning stage: the pretrain manifest when it starts from it.

    Other bases (an OpenAI preset, a model folder) are named in the stage's own config, which is
    already part of its cache key.
    """
    if base_model != PRETRAIN:
        return {}
    return {"pretrain": pretrain or latest_manifest(profile.data_dir, PRETRAIN)}


def base_model_path(base_model: str, upstream: dict[str, dict]) -> str:
    """What gpt_core.weights.load_model should load."""
    if base_model == PRETRAIN:
        return upstream[PRETRAIN]["outputs"]["model"]
    return str(Path(base_model)) if Path(base_model).exists() else base_model
