"""gpt_core's recipes as a notebook uses them: plain calls, no Prefect or MLflow in the process."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt_core.errors import GptflowError
from gpt_core.lora import LoraSettings
from gpt_core.recipes.instruct import InstructSettings
from gpt_core.settings import SettingsError
from gpt_core.train import TrainSettings

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import pandas as pd
    import pyarrow.parquet as pq

    from gpt_core.config import ModelSpec
    from gpt_core.recipes.classifier import (ClassifierSettings, LoraClassifierSettings, fine_tune_classifier,
                                             prepare_classifier)
    from gpt_core.recipes.instruct import InstructSettings, fine_tune_instructions, prepare_instructions
    from gpt_core.recipes.pretrain import PretrainSettings, pretrain

    shard_dir, out = Path(sys.argv[1]), Path(sys.argv[2])

    class Recorder:
        def __init__(self):
            self.names = set()
        def log_metrics(self, metrics, step):
            self.names.update(metrics)
        def log_params(self, params):
            pass
        def log_text(self, text, name):
            pass

    def shards(split):
        return {"shards": [{"path": str(p), "tokens": pq.read_metadata(p).num_rows}
                           for p in sorted(shard_dir.glob(f"{split}-*.parquet"))]}

    logger = Recorder()
    base = pretrain(PretrainSettings(model=ModelSpec(preset="gpt-nano", context_length=32), max_steps=2,
                                     batch_size=4, eval_batches=1, sample_tokens=2, precision="fp32"),
                    {"train": shards("train"), "val": shards("val")}, out / "pretrain", logger=logger,
                    progress=False)
    texts = ["Free entry! Text WIN now", "See you at eight", "Claim your prize", "Lunch tomorrow?"] * 4
    frame = pd.DataFrame({"text": texts, "label": [1, 0, 1, 0] * 4})
    splits = {"train": frame, "validation": frame, "test": frame}
    full = fine_tune_classifier(prepare_classifier(base.model_dir, ClassifierSettings(max_steps=2, batch_size=4,
                                                                                      precision="fp32"), splits),
                                out / "spam", progress=False)
    lora = fine_tune_classifier(prepare_classifier(base.model_dir, LoraClassifierSettings(
        rank=2, alpha=4, max_steps=2, batch_size=4, precision="fp32"), splits), out / "lora", progress=False)
    entries = [{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 8
    answers = fine_tune_instructions(prepare_instructions(base.model_dir, InstructSettings(
        max_steps=2, batch_size=4, max_new_tokens=2, precision="fp32"),
        {"train": entries, "validation": entries, "test": entries[:2]}), out / "instruct", progress=False)
    print(json.dumps({
        "modules": sorted(m for m in ("prefect", "mlflow") if m in sys.modules),
        "pretrain_steps": base.training.steps, "logged": sorted(logger.names),
        "spam_accuracy": full.scores["test"]["accuracy"], "lora_adapters": str(lora.adapters_dir),
        "responses": len(answers.responses), "instruct_model": str(answers.model_dir)}))
''')


def test_every_recipe_runs_without_prefect_or_mlflow(shard_dir, tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(shard_dir), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    assert result["pretrain_steps"] == 2 and {"train/loss", "val/loss", "mfu"} <= set(result["logged"])
    assert 0 <= result["spam_accuracy"] <= 1 and result["responses"] == 2
    assert (Path(result["lora_adapters"]) / "adapters.safetensors").is_file()
    assert (Path(result["instruct_model"]) / "model.safetensors").is_file()


@pytest.mark.parametrize("field, value, message", [
    ("grad_accum", 0, "grad_accum must be greater than 0"),
    ("lr", -1e-3, "lr must be greater than 0"),
    ("lr", float("inf"), "lr must be a finite number"),
    ("batch_size", True, "batch_size must be int"),
    ("precision", "fp8", "precision must be one of 'auto', 'bf16', 'fp32'"),
    ("max_steps", 2.5, "max_steps must be int"),
    ("compile", "maybe", "compile must be bool or one of 'auto', got 'maybe'"),
    ("eval_batches", "all", "eval_batches must be int or null"),
])
def test_settings_check_themselves_naming_the_field(field, value, message):
    with pytest.raises(GptflowError, match=message) as err:
        TrainSettings(**{field: value})
    assert isinstance(err.value, SettingsError)


def test_nested_settings_are_checked_too():
    with pytest.raises(GptflowError, match="rank must be greater than 0"):
        InstructSettings(lora=LoraSettings(rank=0))
    with pytest.raises(GptflowError, match="lora must be"):
        InstructSettings(lora={"rank": 4})
    with pytest.raises(GptflowError, match=r"min_lr \(0.1\) must not exceed lr"):
        TrainSettings(lr=0.01, min_lr=0.1)
