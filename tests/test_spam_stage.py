"""The spam stage as a plain function: a tiny pretrained model -> classifier, MLflow, `gptflow classify`."""

import hashlib
from dataclasses import replace

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from flows.download import Config as DownloadConfig
from flows.pretrain import Config as PretrainConfig
from flows.settings import profile_model
from flows.spam import Config as SpamConfig
from flows.stage import run_stage
from flows.tokenize import Config as TokenizeConfig
from gpt_core.classifier import classify_text
from gpt_core.config import ModelSpec
from gpt_core.errors import GptflowError
from gpt_core.generate import generate
from gpt_core.tokenizer import get_tokenizer
from gpt_core.weights import load_model
from tests.tracking import private_tracking

Profile = profile_model()

SPAM = "You won a free cruise! Text WIN to 80086"
# The longest training message is 120 tokens, more than gpt-nano's context of 64: the stages
# truncate to max_length, which keeps them fast too.
FINE_TUNE = dict(max_length=32, max_steps=6, batch_size=8, eval_batches=2, checkpoint_every=3, lr=1e-3)


def prepare(tmp_path_factory, monkeypatch) -> dict:
    """download -> tokenize -> pretrain on test-sized settings, with a private MLflow store."""
    tmp = tmp_path_factory.mktemp("classifier")
    db, tracking = private_tracking(tmp)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)  # what `classify --model models:/...` resolves with
    profile = Profile(
        data_dir=tmp / "data", mlflow_config=tracking,
        download=DownloadConfig(sources=["sms-spam", "the-verdict", "gpt2-encoder", "gpt2-vocab"]),
        tokenize=TokenizeConfig(corpora=["the-verdict"], workers=1),
        pretrain=PretrainConfig(model=ModelSpec(preset="gpt-nano"), max_steps=2,
                                batch_size=4, eval_batches=1, sample_tokens=0),
        spam=SpamConfig(**FINE_TUNE))
    tokenize = run_stage("tokenize", profile, {"download": run_stage("download", profile)})
    return {"profile": profile, "tmp": tmp, "tokenize": tokenize, "pretrain": run_stage("pretrain", profile, {"tokenize": tokenize})}


@pytest.fixture(scope="module")
def spam(tmp_path_factory, mirror):
    with pytest.MonkeyPatch.context() as monkeypatch:
        setup = prepare(tmp_path_factory, monkeypatch)
        setup["manifest"] = run_stage("spam", setup["profile"], {"tokenize": setup["tokenize"], "pretrain": setup["pretrain"]})
        yield setup


def test_metrics_model_and_manifest(spam):
    manifest = spam["manifest"]
    assert manifest["cached"] is False and manifest["upstream"]["pretrain"]["key"] == spam["pretrain"]["key"]
    metrics, outputs = manifest["metrics"], manifest["outputs"]
    for split in ("train", "val", "test"):
        for name in ("accuracy", "precision", "recall", "f1"):
            assert 0 <= metrics[f"{split}_{name}"] <= 1
    assert sum(map(sum, metrics["test_confusion"])) == 300
    assert metrics["steps"] == 6 and outputs["max_length"] == 32
    assert metrics["params/trainable"] < metrics["params/total"]  # last_block: embeddings stay frozen

    model, config = load_model(outputs["model"])
    assert (config["model"]["num_classes"], config["labels"], config["max_length"]) == (2, ["not spam", "spam"], 32)
    assert model.out_head.out_features == 2
    assert outputs["model_uri"] == "models:/gptflow-spam@newest"


def test_mlflow_run_has_plots_epochs_and_registered_model(spam):
    client = MlflowClient()
    run = client.get_run(spam["manifest"]["mlflow_run_id"])
    assert run.data.metrics["summary/test_accuracy"] == spam["manifest"]["metrics"]["test_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "accuracy.png", "loss.png", "manifest.json"} <= artifacts
    # Accuracies at step 0 (the untrained classifier) and at the end: 6 steps end inside epoch 1.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/accuracy")] == [0, 6]
    version = client.get_model_version_by_alias("gptflow-spam", "newest")
    assert version.run_id == run.info.run_id
    assert str(version.version) == spam["manifest"]["outputs"]["model_version"]
    # The first version is the champion, scored by its validation accuracy.
    assert client.get_model_version_by_alias("gptflow-spam", "champion").version == version.version
    assert version.tags["gptflow.model_sha256"] == spam["manifest"]["outputs"]["model_sha256"]
    assert (version.tags["gptflow.metric"], version.tags["gptflow.metric_direction"]) == ("val_accuracy", "max")
    assert float(version.tags["gptflow.metric_value"]) == spam["manifest"]["metrics"]["val_accuracy"]
    # The MLflow model is a LoggedModel of the run, which shows on the run page.
    [output] = run.outputs.model_outputs
    assert client.get_logged_model(output.model_id).source_run_id == run.info.run_id


def test_the_spam_splits_are_the_runs_input_datasets(spam):
    run = MlflowClient().get_run(spam["manifest"]["mlflow_run_id"])
    splits = spam["tokenize"]["outputs"]["spam"]
    logged = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert sorted(logged) == ["spam-test", "spam-train", "spam-validation"]
    for split, context in (("train", "training"), ("validation", "validation"), ("test", "testing")):
        tags = {t.key: t.value for t in logged[f"spam-{split}"].tags}
        assert tags["gptflow.sha256"] == splits[split]["sha256"]
        assert logged[f"spam-{split}"].dataset.digest == splits[split]["sha256"][:36]
        assert (tags["mlflow.data.context"], tags["rows"]) == (context, str(splits[split]["rows"]))


def test_the_registered_classifier_predicts_labels_with_probabilities(spam):
    model = mlflow.pyfunc.load_model("models:/gptflow-spam@newest")
    texts = [SPAM, "See you at 8 then"]
    answer = model.predict(pd.DataFrame({"text": texts}))
    assert list(answer.columns) == ["label", "probability"]
    classifier, config = load_model(spam["manifest"]["outputs"]["model"])
    expected = [classify_text(classifier, get_tokenizer(), text, config["max_length"], config["labels"])
                for text in texts]
    assert list(answer.itertuples(index=False, name=None)) == pytest.approx(expected)


def test_the_registered_base_model_generates_text(spam):
    model = mlflow.pyfunc.load_model(spam["pretrain"]["outputs"]["model_uri"])
    answer = model.predict(pd.DataFrame({"prompt": ["Every effort moves you"]}),
                           params={"max_new_tokens": 4, "temperature": 0.0})
    base, _ = load_model(spam["pretrain"]["outputs"]["model"])
    tokenizer = get_tokenizer()
    new = generate(base, [tokenizer.encode("Every effort moves you")], 4)[0]
    assert answer["completion"].tolist() == [tokenizer.decode(new)]
    version = MlflowClient().get_model_version_by_alias("gptflow-base", "champion")
    assert (version.tags["gptflow.metric"], version.tags["gptflow.metric_direction"]) == ("final/val_loss", "min")


def test_the_token_shards_are_the_pretrain_runs_input_datasets(spam):
    run = MlflowClient().get_run(spam["pretrain"]["mlflow_run_id"])
    shards = spam["tokenize"]["outputs"]["pretrain"]
    logged = {d.dataset.name: {t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs}
    assert sorted(logged) == ["pretrain-train", "pretrain-val"]
    for split, context in (("train", "training"), ("val", "validation")):
        digest = hashlib.sha256("".join(s["sha256"] for s in shards[split]["shards"]).encode()).hexdigest()
        assert logged[f"pretrain-{split}"]["gptflow.sha256"] == digest
        assert logged[f"pretrain-{split}"]["mlflow.data.context"] == context
        assert logged[f"pretrain-{split}"]["shards"] == str(len(shards[split]["shards"]))


def test_same_config_is_cached_and_forced_run_resumes(spam):
    client = MlflowClient()

    def registry():
        return (sorted(str(v.version) for v in client.search_model_versions("name='gptflow-spam'")),
                *(str(client.get_model_version_by_alias("gptflow-spam", a).version) for a in ("newest", "champion")))

    before = registry()
    again = run_stage("spam", spam["profile"], {"tokenize": spam["tokenize"], "pretrain": spam["pretrain"]})
    assert again["cached"] is True and again["key"] == spam["manifest"]["key"]
    assert registry() == before  # a reused stage registers nothing and moves no alias
    # Forced into the same folder, training resumes from its last checkpoint: same model, same scores.
    forced = run_stage("spam", spam["profile"], {"tokenize": spam["tokenize"], "pretrain": spam["pretrain"]}, force=True)
    assert forced["metrics"]["test_accuracy"] == spam["manifest"]["metrics"]["test_accuracy"]
    assert forced["outputs"]["model_sha256"] == spam["manifest"]["outputs"]["model_sha256"]
    # The same weights: no second version, and the new run is linked to the model logged first.
    assert registry() == before
    assert forced["outputs"]["model_version"] == spam["manifest"]["outputs"]["model_version"]
    [first] = client.get_run(spam["manifest"]["mlflow_run_id"]).outputs.model_outputs
    [linked] = client.get_run(forced["mlflow_run_id"]).outputs.model_outputs
    assert linked.model_id == first.model_id


def test_classify_a_folder_and_a_registered_model(spam, run_cli):
    folder = spam["manifest"]["outputs"]["model"]
    results = [run_cli("classify", "--model", model, SPAM)
               for model in (folder, folder, "models:/gptflow-spam@newest")]
    assert results[0] == results[1] == results[2]
    code, out, err = results[0]
    assert code == 0, err
    label, probability = out.strip().rsplit(" ", 1)
    assert label in ("spam", "not spam") and 0.5 <= float(probability.strip("()")) <= 1


@pytest.mark.parametrize("model, text, message", [
    ("classifier", "   ", "the text is empty"),
    ("base", SPAM, "is not a classifier"),
])
def test_classify_bad_input(spam, run_cli, model, text, message):
    outputs = spam[{"classifier": "manifest", "base": "pretrain"}[model]]["outputs"]
    code, out, err = run_cli("classify", "--model", outputs["model"], text)
    assert code == 2 and out == "" and message in err


def test_base_model_with_a_short_context_fails_up_front(spam):
    """Padded to the longest training message, the texts do not fit gpt-nano's context."""
    profile = spam["profile"].model_copy(update={"spam": SpamConfig(**{**FINE_TUNE, "max_length": None})})
    stage_folders = set((profile.data_dir / "spam").iterdir())
    with pytest.raises(GptflowError, match="padded length 120 exceeds the model's context of 64; set max_length"):
        run_stage("spam", profile, {"tokenize": spam["tokenize"], "pretrain": spam["pretrain"]})
    assert set((profile.data_dir / "spam").iterdir()) == stage_folders


@pytest.mark.parametrize("text, label, message", [
    ("   ", "ham", "row 1: the text is empty"),
    ("See you at 8", "eggs", "row 1: label 'eggs' is not 0/1 or ham/spam"),
])
def test_bad_rows_fail_up_front_naming_the_split(spam, tmp_path, text, label, message):
    path = tmp_path / "spam.parquet"
    pd.DataFrame({"text": ["Free entry! Text WIN now", text], "label": ["spam", label]}).to_parquet(path)
    tokenize = {**spam["tokenize"], "outputs": {"spam": {split: {"path": str(path)}
                                                         for split in ("train", "validation", "test")}}}
    with pytest.raises(GptflowError, match=f"train split: {message}"):
        run_stage("spam", spam["profile"], {"tokenize": tokenize, "pretrain": spam["pretrain"]})


def test_a_gpu_asked_for_where_there_is_none_is_refused_up_front(spam):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    profile = spam["profile"].model_copy(update={"spam": replace(spam["profile"].spam, device="cuda")})
    with pytest.raises(GptflowError, match="no CUDA GPU is visible"):
        run_stage("spam", profile, {"tokenize": spam["tokenize"], "pretrain": spam["pretrain"]})


def test_a_base_model_folder_is_keyed_by_its_content(spam, tmp_path):
    """Replacing a base model folder's weights in place re-runs the stage; untouched, it is reused."""
    import shutil

    from gpt_core.weights import save_model

    base = tmp_path / "base"
    shutil.copytree(spam["pretrain"]["outputs"]["model"], base)
    profile = spam["profile"].model_copy(update={"spam": SpamConfig(**{**FINE_TUNE, "max_steps": 1},
                                                                    base_model=str(base))})
    upstream = {"tokenize": spam["tokenize"]}
    first = run_stage("spam", profile, upstream)
    assert first["cached"] is False
    assert run_stage("spam", profile, upstream)["cached"] is True

    model, config = load_model(base)
    with torch.no_grad():
        model.final_norm.weight.mul_(2)
    save_model(model, base, {k: v for k, v in config.items() if k not in ("format", "model")})
    replaced = run_stage("spam", profile, upstream)
    assert replaced["cached"] is False and replaced["key"] != first["key"]
