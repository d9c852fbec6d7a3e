"""LoRA stage: the spam classifier trained through low-rank adapters (the book's appendix E).

The new classification head is added, everything is frozen, and the targeted Linear layers get
adapters. Unlike the book, which leaves the new head's random weights frozen behind an adapter,
the head itself is trained too: it is new, not pretrained, so there is nothing to preserve, and
it adds only emb_dim x 2 parameters. `lora.trainable` has no effect here.
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

    def make_trainable(model):
        inject_lora(model, **cfg.lora.model_dump())
        head = getattr(model.out_head, "linear", model.out_head)  # wrapped when targets is "all"
        head.requires_grad_(True)

    return run_classifier("lora", profile, cfg, tokenize, pretrain, force, make_trainable=make_trainable,
                          export=export)


@flow(name="lora", log_prints=True)
def lora_flow(profile: Profile, tokenize: dict | None = None, pretrain: dict | None = None,
              force: bool = False) -> dict:
    return run_lora(profile, tokenize, pretrain, force)
