"""Export stage: the instruct model in the forms other tools load (gpt_core.export), each logged as
an MLflow artifact of the stage's run.

    export: {formats: [hf, gguf, ollama], dtype: f16}

hf is a transformers folder, gguf one llama.cpp file, ollama a folder with the GGUF and a
Modelfile (`ollama create NAME -f Modelfile`). No formats: the stage writes nothing.
"""

from dataclasses import dataclass, field

import mlflow

from gpt_core.export import Dtype, Format, export_model
from gpt_core.files import sha256_file
from gpt_core.settings import Settings, setting

from .settings import stage_config


@stage_config
@dataclass(frozen=True)
class Config(Settings):
    formats: list[Format] = field(default_factory=list, metadata={"doc": "any of hf, gguf, ollama"})
    dtype: Dtype = setting("f32", doc="tensor type of GGUF exports")


def run(ctx) -> tuple[dict, dict]:
    model = ctx.upstream["instruct"]["outputs"]["model"]
    outputs = {}
    for fmt in ctx.config.formats:
        target = ctx.folder / fmt
        written = export_model(model, fmt, target / "model.gguf" if fmt == "gguf" else target,
                               dtype=None if fmt == "hf" else ctx.config.dtype)
        mlflow.log_artifacts(str(target), artifact_path=f"export/{fmt}")
        files = sorted(p for p in target.rglob("*") if p.is_file())
        outputs[fmt] = {"path": str(written), "files": {str(p.relative_to(target)): sha256_file(p) for p in files}}
    return outputs, {"formats": len(outputs)}
