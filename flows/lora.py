"""LoRA stage: the spam classifier trained through low-rank adapters (the book's appendix E).

The recipe is the spam stage's (gpt_core.recipes.classifier); its settings take the LoRA
adapter's fields (`lora.rank`, `lora.alpha`, ...) in place of the choice of trainable layers.
"""

from dataclasses import dataclass

from gpt_core.recipes.classifier import LoraClassifierSettings
from gpt_core.settings import setting

from .settings import BASE_MODEL_DOC, FineTuning, stage_config
from .spam import inputs, prepare, run  # noqa: F401  (the spam stage's: the recipe tells the two apart by settings)


@stage_config
@dataclass(frozen=True)
class Config(LoraClassifierSettings, FineTuning):
    base_model: str = setting("pretrain", doc=BASE_MODEL_DOC)
    registered_name: str = setting("gptflow-spam-lora", doc="MLflow registered model name")
