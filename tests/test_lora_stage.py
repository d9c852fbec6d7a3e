"""The LoRA stage as a plain function: adapters on the spam task, parameter share, merged model."""

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from test_spam_stage import FINE_TUNE, SPAM, prepare

from flows.lora import Config as LoraConfig
from flows.stage import run_stage
from gpt_core.classifier import add_classification_head
from gpt_core.lora import load_adapters, merge_lora
from gpt_core.weights import load_model


@pytest.fixture(scope="module")
def lora(tmp_path_factory, mirror):
    with pytest.MonkeyPatch.context() as monkeypatch:
        setup = prepare(tmp_path_factory, monkeypatch)
        profile = setup["profile"].model_copy(
            update={"lora": LoraConfig(rank=2, alpha=4, embedding_rank=2, **FINE_TUNE)})
        setup["manifest"] = run_stage("lora", profile, {"tokenize": setup["tokenize"], "pretrain": setup["pretrain"]})
        yield setup


def test_parameter_share_is_logged_beside_the_accuracies(lora):
    metrics = lora["manifest"]["metrics"]
    assert 0 < metrics["params/trainable"] < metrics["params/total"]
    assert metrics["params/trainable_share"] == metrics["params/trainable"] / metrics["params/total"]
    run = MlflowClient().get_run(lora["manifest"]["mlflow_run_id"])
    for name in ("params/trainable", "params/total", "params/trainable_share", "test_accuracy", "test_f1"):
        assert run.data.metrics[f"summary/{name}"] == pytest.approx(metrics[name])


def test_adapters_on_the_base_model_give_the_merged_model(lora):
    """The adapters (with the book's frozen new head) are all that fine-tuning changed."""
    adapters = Path(lora["manifest"]["outputs"]["adapters"])
    config = json.loads((adapters / "adapters.json").read_text())
    assert (config["rank"], config["alpha"], config["targets"], config["max_length"]) == (2, 4.0, "all", 32)
    base, _ = load_model(lora["pretrain"]["outputs"]["model"])
    load_adapters(add_classification_head(base), adapters)
    merge_lora(base)
    merged, _ = load_model(lora["manifest"]["outputs"]["model"])
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor, base.state_dict()[name], atol=1e-6), name


def test_merged_model_is_registered_and_classifies(lora, run_cli):
    client = MlflowClient()
    version = client.get_model_version_by_alias("gptflow-spam-lora", "newest")
    assert version.run_id == lora["manifest"]["mlflow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(version.run_id)}
    assert {"adapters", "confusion_matrix.png", "accuracy.png"} <= artifacts
    [output] = client.get_run(version.run_id).outputs.model_outputs  # the MLflow model of the run
    assert client.get_logged_model(output.model_id).source_run_id == version.run_id
    code, out, err = run_cli("classify", "--model", "models:/gptflow-spam-lora@newest", SPAM)
    assert code == 0, err
    assert out.startswith(("spam (", "not spam ("))
