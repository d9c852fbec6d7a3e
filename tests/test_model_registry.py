"""Registered models are MLflow pyfunc models, registered once per trained model, with aliases
that mean something: @newest (the latest trained) and @champion (the best on validation).

Tiny random models keep these fast; the stage tests check the same on trained ones.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from servers import free_port, wait_until_healthy

from flows.tracking import ModelScore, configure, log_model, resolve_model
from gpt_core.config import PRESETS
from gpt_core.generate import generate
from gpt_core.model import GPTModel
from gpt_core.tokenizer import encode_with_end_of_text, get_tokenizer
from gpt_core.weights import load_model, save_model

PROMPT = "Every effort moves you"


def tiny_model(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_model(GPTModel(PRESETS["gpt-nano"]), folder, {"tokenizer": "gpt2", "recipe": "pretrain"})


def loss(value: float) -> ModelScore:
    return ModelScore("final/val_loss", value, "min")


def aliases(name: str) -> dict[str, str]:
    client = MlflowClient()
    return {alias: str(client.get_model_version_by_alias(name, alias).version) for alias in ("newest", "champion")}


@pytest.fixture
def store(tracking):
    configure(tracking)
    return tracking


@pytest.mark.parametrize("new, old, beats", [
    (loss(2.0), loss(3.0), True), (loss(3.0), loss(3.0), False), (loss(4.0), loss(3.0), False),
    (ModelScore("val_accuracy", 0.9, "max"), ModelScore("val_accuracy", 0.8, "max"), True),
    (ModelScore("val_accuracy", 0.7, "max"), ModelScore("val_accuracy", 0.8, "max"), False),
    (loss(9.0), None, True), (loss(9.0), ModelScore("val_accuracy", 0.8, "max"), True),
    (loss(float("nan")), loss(3.0), False), (ModelScore("final/val_loss", None, "min"), None, False),
])
def test_a_score_beats_only_a_worse_or_incomparable_one(new, old, beats):
    assert new.beats(old) is beats
    if new.known:
        assert ModelScore.from_tags(new.tags()) == new


def test_champion_moves_only_on_improvement(store, tmp_path):
    with mlflow.start_run():
        first = log_model(tiny_model(tmp_path / "a", 1), "reg-base", store, score=loss(3.0))
        assert (first.version, first.new, first.champion) == ("1", True, True)
        assert aliases("reg-base") == {"newest": "1", "champion": "1"}

        worse = log_model(tiny_model(tmp_path / "b", 2), "reg-base", store, score=loss(4.0))
        assert (worse.version, worse.champion, worse.uri) == ("2", False, "models:/reg-base@newest")
        assert aliases("reg-base") == {"newest": "2", "champion": "1"}

        better = log_model(tiny_model(tmp_path / "c", 3), "reg-base", store, score=loss(2.5))
        assert (better.version, better.champion) == ("3", True)
        assert aliases("reg-base") == {"newest": "3", "champion": "3"}
    tags = MlflowClient().get_model_version("reg-base", "2").tags
    assert (tags["gptflow.metric"], float(tags["gptflow.metric_value"]), tags["gptflow.metric_direction"]) == (
        "final/val_loss", 4.0, "min")


def test_the_same_weights_are_registered_once(store, tmp_path):
    client = MlflowClient()
    folder = tiny_model(tmp_path / "a", 1)
    with mlflow.start_run() as first_run:
        first = log_model(folder, "reg-once", store, score=loss(3.0))
        log_model(tiny_model(tmp_path / "b", 2), "reg-once", store, score=loss(2.0))
    with mlflow.start_run() as again_run:  # e.g. a forced re-run that resumed the finished checkpoint
        again = log_model(folder, "reg-once", store, score=loss(3.0))
    assert (again.new, again.version, again.model_id) == (False, first.version, first.model_id)
    assert again.uri == "models:/reg-once/1"  # @newest stays with the model trained last
    assert sorted(str(v.version) for v in client.search_model_versions("name='reg-once'")) == ["1", "2"]
    assert aliases("reg-once") == {"newest": "2", "champion": "2"}
    # The second run is linked to the model logged the first time: the run page shows it.
    outputs = client.get_run(again_run.info.run_id).outputs.model_outputs
    assert [o.model_id for o in outputs] == [first.model_id]
    logged = client.get_logged_model(first.model_id)
    assert logged.source_run_id == first_run.info.run_id
    assert client.get_model_version("reg-once", "1").tags["gptflow.model_sha256"] == logged.tags[
        "gptflow.model_sha256"]


def expected_completion(folder: Path, prompt: str, max_new_tokens: int) -> str:
    model, _ = load_model(folder)
    tokenizer = get_tokenizer()
    return tokenizer.decode(generate(model, [encode_with_end_of_text(tokenizer, prompt)], max_new_tokens)[0])


def test_base_model_is_a_pyfunc_model_with_weights_as_safetensors(store, tmp_path):
    folder = tiny_model(tmp_path / "model", 1)
    with mlflow.start_run():
        registered = log_model(folder, "reg-pyfunc", store, score=loss(3.0))
    model = mlflow.pyfunc.load_model(registered.uri)
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["prompt"]
    assert {p.name: p.default for p in signature.params} == {
        "max_new_tokens": 50, "temperature": 0.0, "top_k": None, "top_p": None, "seed": None}
    answer = model.predict(pd.DataFrame({"prompt": [PROMPT, "Hello"]}), params={"max_new_tokens": 6})
    assert list(answer.columns) == ["text", "completion"]
    assert answer["completion"].tolist() == [expected_completion(folder, p, 6) for p in (PROMPT, "Hello")]
    assert answer["text"][0] == PROMPT + answer["completion"][0]

    # The CLI's models:/ spec resolves to the logged weights folder, which holds nothing pickled.
    weights = Path(resolve_model(registered.uri, store))
    assert sorted(p.name for p in weights.iterdir()) == ["config.json", "model.safetensors"]
    local = Path(mlflow.artifacts.download_artifacts(registered.uri))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]
    assert (local / "code" / "gpt_core" / "weights.py").is_file()
    assert (local / "input_example.json").is_file()


def post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_mlflow_models_serve_answers_invocations(store, tmp_path):
    folder = tiny_model(tmp_path / "model", 1)
    with mlflow.start_run():
        log_model(folder, "reg-served", store, score=loss(3.0))
    port = free_port()
    # No mirror and an empty tiktoken cache: the model brings its own copy of the BPE files.
    env = {k: v for k, v in os.environ.items() if k != "GPTFLOW_MIRROR"}
    env["TIKTOKEN_CACHE_DIR"] = str(tmp_path / "empty-tiktoken-cache")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/reg-served@newest",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(f"{url}/ping", server, log, timeout=300)
        status, body = post(f"{url}/invocations", {
            "dataframe_split": {"columns": ["prompt"], "data": [[PROMPT]]}, "params": {"max_new_tokens": 5}})
        assert status == 200, body
        assert body["predictions"] == [{"text": PROMPT + expected_completion(folder, PROMPT, 5),
                                        "completion": expected_completion(folder, PROMPT, 5)}]
        status, body = post(f"{url}/invocations", {"inputs": {"prompt": [PROMPT]}, "params": {"max_new_tokens": 0}})
        assert status == 400 and "max_new_tokens must be at least 1" in body["message"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: mlflow and uvicorn
        server.wait(60)
