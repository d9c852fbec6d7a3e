"""LoRA stage: the spam classifier trained through low-rank adapters (the book's appendix E).

As in the book, the new classification head is added, everything is frozen, and the targeted
Linear layers get adapters: with targets "all" the head is one of them, so its random weight
stays frozen and only its adapter learns. `lora.trainable` has no effect here.
"""

import mlflow
from prefect import flow

from gpt_core.files import sha256_file
from gpt_core.lora import ADAPTERS_FILE, inject_lora, merge_lora, save_adapters

from .settings import Profile
from .spam import run_classifier


def run_lora(profile: Profile, tokenize: dict | None = None, pretrain: dict | None = None,
             force: bool = False) -> dict:
    cfg = profile.lora

    def export(model, folder, info):
        """Save the adapters alone, then merge them so the saved model is a plain classifier."""
        adapters = save_adapters(model, folder / "adapters", info)
        mlflow.log_artifacts(str(adapters), artifact_path="adapters")
        merge_lora(model)
        return {"adapters": str(adapters), "adapters_sha256": sha256_file(adapters / ADAPTERS_FILE)}

    return run_classifier("lora", profile, cfg, tokenize, pretrain, force,
                          make_trainable=lambda model: inject_lora(model, **cfg.lora.model_dump()),
                          export=export)


@flow(name="lora", log_prints=True)
def lora_flow(profile: Profile, tokenize: dict | None = None, pretrain: dict | None = None,
              force: bool = False) -> dict:
    return run_lora(profile, tokenize, pretrain, force)
