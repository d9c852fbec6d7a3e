"""The instruct stage as a plain function: a tiny pretrained model -> instruction model, test
responses, MLflow, `gptflow ask`, and the judge stage on those responses."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from flows.download import Config as DownloadConfig
from flows.instruct import Config as InstructConfig
from flows.instruct import log_table
from flows.judge import Config as JudgeConfig
from flows.pretrain import Config as PretrainConfig
from flows.settings import profile_model
from flows.stage import run_stage
from flows.tokenize import Config as TokenizeConfig
from flows.tracking import configure
from gpt_core.config import ModelSpec
from gpt_core.errors import GptflowError
from gpt_core.instruct import generate_responses
from gpt_core.lora import LoraSettings
from gpt_core.supervised import read_instructions
from gpt_core.tokenizer import get_tokenizer
from gpt_core.weights import load_model
from tests.ollama_stub import OllamaStub
from tests.tracking import private_tracking

# The longest instruction example is 92 tokens with its end-of-text: a 128-token context holds all.
CONTEXT = 128
# allowed_max_length 80 truncates the few longest training examples, as the book's collate would.
FINE_TUNE = dict(max_steps=12, lr=5e-3, batch_size=4, eval_every=6, eval_batches=2, checkpoint_every=12,
                 allowed_max_length=80, max_new_tokens=8, generation_batch_size=32)
SIMILE = ["Rewrite the sentence using a simile.", "--input", "The car is very fast."]


Profile = profile_model()


def make_profile(root: Path, mlflow_config: Path, **instruct) -> Profile:
    return Profile(
        data_dir=root / "data", mlflow_config=mlflow_config,
        download=DownloadConfig(sources=["instruction-data", "the-verdict", "gpt2-encoder", "gpt2-vocab"]),
        tokenize=TokenizeConfig(corpora=["the-verdict"], workers=1),
        pretrain=PretrainConfig(model=ModelSpec(preset="gpt-nano", context_length=CONTEXT), max_steps=1,
                                batch_size=2, eval_batches=1, sample_tokens=0),
        instruct=InstructConfig(**{**FINE_TUNE, **instruct}))


@pytest.fixture(scope="module")
def stages(tmp_path_factory, mirror):
    """download -> tokenize -> pretrain -> instruct on test-sized settings, with a private MLflow store."""
    root = tmp_path_factory.mktemp("instruct")
    db, config = private_tracking(root)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", db)  # what `ask --model models:/...` resolves with
        profile = make_profile(root, config)
        tokenize = run_stage("tokenize", profile, {"download": run_stage("download", profile)})
        pretrain = run_stage("pretrain", profile, {"tokenize": tokenize})
        yield {"profile": profile, "tokenize": tokenize, "pretrain": pretrain,
               "instruct": run_stage("instruct", profile, {"tokenize": tokenize, "pretrain": pretrain})}


def test_every_test_example_gets_a_response(stages):
    manifest = stages["instruct"]
    outputs, metrics = manifest["outputs"], manifest["metrics"]
    test = read_instructions(stages["tokenize"]["outputs"]["instruct"]["test"]["json_path"])
    responses = json.loads(Path(outputs["responses"]).read_text())
    assert len(responses) == len(test) == 110
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == test
    assert all(isinstance(r["model_response"], str) for r in responses)
    frame = pd.read_parquet(outputs["responses_parquet"])
    assert list(frame.columns) == ["instruction", "input", "output", "model_response"]
    assert frame.to_dict("records") == responses
    assert metrics["n_responses"] == 110
    assert metrics["n_empty_responses"] == sum(not r["model_response"].strip() for r in responses)
    assert outputs["counts"] == {"train": 935, "validation": 55, "test": 110}


def test_fine_tuning_lowers_the_validation_loss(stages):
    metrics = stages["instruct"]["metrics"]
    assert metrics["steps"] == 12
    assert metrics["val_loss_after"] < metrics["val_loss_before"] - 0.5
    assert metrics["truncated_examples"] > 0  # allowed_max_length 80 cut the longest, and says so


def test_mlflow_run_table_and_registered_model(stages):
    manifest = stages["instruct"]
    run_id = manifest["mlflow_run_id"]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["upstream.pretrain.mlflow_run_id"] == stages["pretrain"]["mlflow_run_id"]
    assert run.data.metrics["summary/val_loss_before"] == manifest["metrics"]["val_loss_before"]
    val_history = client.get_metric_history(run_id, "val/loss")
    assert [m.step for m in val_history] == [0, 6, 12]
    assert val_history[0].value == manifest["metrics"]["val_loss_before"]
    assert len(client.get_metric_history(run_id, "train/loss")) == 12
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"responses.json", "loss.png", "manifest.json"} <= artifacts
    [output] = run.outputs.model_outputs  # the MLflow model, a LoggedModel of the run
    assert client.get_logged_model(output.model_id).source_run_id == run_id
    table = mlflow.load_table("responses.json", run_ids=[run_id])
    assert len(table) == 110 and table["model_response"].tolist() == [
        r["model_response"] for r in json.loads(Path(manifest["outputs"]["responses"]).read_text())]

    assert manifest["outputs"]["model_uri"] == "models:/gptflow-instruct@newest"
    assert client.get_model_version_by_alias("gptflow-instruct", "newest").run_id == run_id
    champion = client.get_model_version_by_alias("gptflow-instruct", "champion")
    assert (champion.tags["gptflow.metric"], float(champion.tags["gptflow.metric_value"])) == (
        "val_loss_after", manifest["metrics"]["val_loss_after"])
    datasets = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    splits = stages["tokenize"]["outputs"]["instruct"]
    assert {name: d.digest for name, d in datasets.items()} == {
        f"instruct-{split}": splits[split]["json_sha256"][:36] for split in ("train", "validation", "test")}
    _, config = load_model(manifest["outputs"]["model"])
    assert (config["style"], config["recipe"]) == ("alpaca", "instruct")


def expected_answer(folder, style, max_new_tokens):
    model, _ = load_model(folder)
    entry = {"instruction": SIMILE[0], "input": SIMILE[2]}
    return generate_responses(model, get_tokenizer(), [entry], style=style, max_new_tokens=max_new_tokens)[0]


@pytest.mark.parametrize("registry", [False, True], ids=["folder", "models-uri"])
def test_ask_prints_the_answer(stages, run_cli, registry):
    outputs = stages["instruct"]["outputs"]
    model = outputs["model_uri"] if registry else outputs["model"]
    code, out, err = run_cli("ask", "--model", model, *SIMILE, "--max-new-tokens", "8")
    assert code == 0, err
    assert out == expected_answer(outputs["model"], "alpaca", 8) + "\n"


def test_the_registered_model_answers_instructions(stages):
    outputs = stages["instruct"]["outputs"]
    model = mlflow.pyfunc.load_model(outputs["model_uri"])
    assert model.metadata.signature.inputs.input_names() == ["instruction", "input"]
    answer = model.predict(pd.DataFrame({"instruction": [SIMILE[0]], "input": [SIMILE[2]]}),
                           params={"max_new_tokens": 8})
    assert answer["response"].tolist() == [expected_answer(outputs["model"], "alpaca", 8)]
    # The input column is optional.
    assert len(model.predict(pd.DataFrame({"instruction": ["Say hi."]}), params={"max_new_tokens": 2})) == 1


def test_ask_without_a_model_is_a_one_line_error(run_cli, tmp_path):
    code, out, err = run_cli("ask", "--model", str(tmp_path / "nothing"), "Say hi.")
    assert code == 2 and err.startswith("gptflow: error: no model at") and err.count("\n") == 1


def test_unchanged_inputs_reuse_the_output(stages):
    again = run_stage("instruct", stages["profile"], {"tokenize": stages["tokenize"], "pretrain": stages["pretrain"]})
    assert again["cached"] is True and again["key"] == stages["instruct"]["key"]


def test_overflow_error_names_the_example_before_any_work(stages, tracking, tmp_path):
    profile = make_profile(tmp_path, tracking, allowed_max_length=40, overflow="error")
    with pytest.raises(GptflowError, match=r"train example #\d+ \('.+'\) has a \d+-token prompt, longer than "
                                           r"the 40 tokens allowed .* overflow=truncate"):
        run_stage("instruct", profile, {"tokenize": stages["tokenize"], "pretrain": stages["pretrain"]})
    assert not (tmp_path / "data").exists()


def test_lora_phi3_model_is_merged_and_ask_uses_its_style(stages, tracking, tmp_path, run_cli):
    # targets="attention": the tied output head of gpt-nano cannot yet be checkpointed with an
    # adapter around it (weights.model_state keeps both names of the shared tensor).
    profile = make_profile(tmp_path, tracking, style="phi3", max_steps=2, eval_every=2, eval_batches=1,
                           lora=LoraSettings(rank=4, alpha=8, targets="attention"), max_new_tokens=1)
    manifest = run_stage("instruct", profile, {"tokenize": stages["tokenize"], "pretrain": stages["pretrain"]})
    model, config = load_model(manifest["outputs"]["model"])  # loads as a plain GPTModel: adapters merged
    assert manifest["metrics"]["trainable_parameters"] < model.num_parameters()
    assert config["style"] == "phi3"
    code, out, err = run_cli("ask", "--model", manifest["outputs"]["model"], *SIMILE, "--max-new-tokens", "8")
    assert code == 0, err
    assert out == expected_answer(manifest["outputs"]["model"], "phi3", 8) + "\n"


def test_a_resumed_run_replaces_its_table_instead_of_appending(tracking):
    configure(tracking)
    with mlflow.start_run() as run:
        log_table(pd.DataFrame({"response": ["first attempt", "x"]}), "responses.json")
        log_table(pd.DataFrame({"response": ["second attempt"]}), "responses.json")
    assert mlflow.load_table("responses.json", run_ids=[run.info.run_id])["response"].tolist() == ["second attempt"]


def test_judge_scores_the_instruct_responses(stages, tracking, tmp_path):
    profile = make_profile(tmp_path, tracking)
    with OllamaStub(reply="42") as stub:
        profile.judge = JudgeConfig(host=stub.url)
        manifest = run_stage("judge", profile, {"instruct": stages["instruct"]})
    metrics = manifest["metrics"]
    assert metrics["n_total"] == 110 and metrics["n_unscored"] == 0
    assert len(stub.chats) == 110 - stages["instruct"]["metrics"]["n_empty_responses"]
    run = MlflowClient().get_run(manifest["mlflow_run_id"])
    assert run.data.tags["upstream.instruct.mlflow_run_id"] == stages["instruct"]["mlflow_run_id"]
