"""The judge stage as a plain function, against an Ollama stub on 127.0.0.1.

Its input is an instruct manifest written here by hand (responses.json and its hash), so every
response, and so every judge reply, is chosen by the test; tests/test_instruct_stage.py runs the
judge on a real instruct output.
"""

import json
import socket

import mlflow
import pytest
from mlflow import MlflowClient

from flows import cli, pipeline, stage
from flows.judge import Config as JudgeConfig
from flows.judge import cache_path
from flows.settings import profile_model
from flows.stage import run_stage
from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.judge import PROMPT_VERSION
from tests.ollama_stub import OllamaStub

Profile = profile_model()

RESPONSES = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a cheetah."},
    {"instruction": "What is the capital of France?", "input": "",
     "output": "The capital of France is Paris.", "model_response": "Paris."},
    {"instruction": "Name a primary color.", "input": "", "output": "Red.", "model_response": "GARBLED"},
    {"instruction": "Convert 45 kilometers to meters.", "input": "",
     "output": "45 kilometers is 45000 meters.", "model_response": ""},
]


def reply(prompt: str) -> str:
    """85 for the simile, 40 for Paris, no number at all for the garbled answer."""
    if "GARBLED" in prompt:
        return "I cannot score this."
    return "85" if "cheetah" in prompt else "Score: 40"


@pytest.fixture
def stub():
    with OllamaStub(reply=reply) as server:
        yield server


@pytest.fixture
def instruct(tmp_path) -> dict:
    path = tmp_path / "instruct" / "responses.json"
    path.parent.mkdir()
    path.write_text(json.dumps(RESPONSES))
    return {"stage": "instruct", "key": "0123456789abcdef", "mlflow_run_id": "instruct-run",
            "outputs": {"responses": str(path), "responses_sha256": sha256_file(path)}}


def make_profile(tmp_path, tracking, **judge) -> Profile:
    return Profile(data_dir=tmp_path / "data", mlflow_config=tracking, judge=JudgeConfig(**judge))


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_scores_table_histogram_and_lineage_in_mlflow(stub, instruct, tracking, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", stub.url)
    manifest = run_stage("judge", make_profile(tmp_path, tracking), {"instruct": instruct})
    metrics = manifest["metrics"]
    # Empty answers score 0 without asking (the book's rule); the garbled one stays unscored.
    assert (metrics["n_scored"], metrics["n_unscored"], metrics["n_total"]) == (3, 1, 4)
    assert metrics["mean_score"] == pytest.approx((85 + 40 + 0) / 3)
    assert len(stub.chats) == 2 + 2  # the garbled answer is asked twice, the second time with a reminder
    assert {c["model"] for c in stub.chats} == {"llama3"}

    rows = json.loads((tmp_path / "data/judge" / manifest["key"] / "judgements.json").read_text())
    assert [r["score"] for r in rows] == [85, 40, None, 0]
    assert rows[2]["judge_reply"] == "I cannot score this." and "not a single integer" in rows[2]["error"]
    assert rows[0]["expected"] == RESPONSES[0]["output"] and rows[0]["response"] == RESPONSES[0]["model_response"]
    assert {r["prompt_version"] for r in rows} == {PROMPT_VERSION}

    client = MlflowClient()
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["summary/mean_score"] == pytest.approx(125 / 3) and run.data.metrics["summary/n_unscored"] == 1
    assert run.data.params["model"] == "llama3" and run.data.params["prompt_version"] == PROMPT_VERSION
    assert run.data.params["judge.seed"] == "123" and run.data.params["judge.num_ctx"] == "2048"
    assert run.data.tags["upstream.instruct.mlflow_run_id"] == "instruct-run"
    assert run.data.tags["judge.model"] == "llama3"
    assert {"judgements.json", "scores.png", "manifest.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    table = mlflow.load_table("judgements.json", run_ids=[run.info.run_id])
    assert table["instruction"].tolist() == [r["instruction"] for r in RESPONSES]


def test_rerun_asks_only_for_what_the_cache_lacks(stub, instruct, tracking, tmp_path):
    profile = make_profile(tmp_path, tracking, host=stub.url)
    first = run_stage("judge", profile, {"instruct": instruct})
    asked = len(stub.chats)
    assert cache_path(profile).is_file() and not cache_path(profile).is_relative_to(
        tmp_path / "data/judge" / first["key"])

    again = run_stage("judge", profile, {"instruct": instruct}, force=True)
    assert len(stub.chats) == asked + 2  # only the unscored (garbled) answer is asked again
    assert again["metrics"]["n_cached"] == 2 and again["metrics"]["mean_score"] == first["metrics"]["mean_score"]

    # A changed stage config is a new output folder, but the judgements are still the cache's.
    stub.reply = "70"
    changed = run_stage("judge", make_profile(tmp_path, tracking, host=stub.url, timeout=30), {"instruct": instruct})
    assert changed["key"] != first["key"] and changed["metrics"]["n_scored"] == 4
    assert len(stub.chats) == asked + 3  # the garbled answer, now scored 70
    assert changed["metrics"]["mean_score"] == pytest.approx((85 + 40 + 70 + 0) / 4)


def test_a_finished_output_is_reused_only_for_the_same_judge(instruct, tracking, tmp_path):
    """The stage's output is keyed by the judge's identity as the server reports it."""
    with OllamaStub() as stub:
        profile = make_profile(tmp_path, tracking, host=stub.url)
        first = run_stage("judge", profile, {"instruct": instruct})
        assert run_stage("judge", profile, {"instruct": instruct})["cached"] is True
        asked = len(stub.chats)
        stub.digests["llama3:latest"] = "f" * 64  # another model behind the same name and URL
        other = run_stage("judge", profile, {"instruct": instruct})
        assert other["cached"] is False and other["key"] != first["key"] and len(stub.chats) > asked
        assert other["outputs"]["judge_identity"] != first["outputs"]["judge_identity"]
    # With the server down nobody can say who judged: nothing is reused, and the error says why.
    with pytest.raises(GptflowError, match="`ollama serve`"):
        run_stage("judge", profile, {"instruct": instruct})


def test_ollama_down_fails_with_how_to_start_it(instruct, tracking, tmp_path):
    profile = make_profile(tmp_path, tracking, host=closed_port_url())
    with pytest.raises(GptflowError, match="`ollama serve`"):
        run_stage("judge", profile, {"instruct": instruct})
    assert not (tmp_path / "data/judge").exists()


def test_ollama_down_and_optional_skips_without_a_manifest(instruct, tracking, tmp_path):
    profile = make_profile(tmp_path, tracking, host=closed_port_url(), optional=True)
    result = run_stage("judge", profile, {"instruct": instruct})
    assert result["skipped"] is True and result["stage"] == "judge" and "`ollama serve`" in result["reason"]
    assert not list(tmp_path.glob("data/judge/*/manifest.json"))
    [run] = MlflowClient().search_runs([mlflow.get_experiment_by_name("test").experiment_id],
                                       filter_string="tags.`gptflow.skipped` = 'true'")
    assert "`ollama serve`" in run.data.tags["gptflow.skip_reason"]
    assert run.data.tags["upstream.instruct.mlflow_run_id"] == "instruct-run"


def test_cli_reports_the_skip(instruct, tracking, tmp_path, monkeypatch, capsys):
    # The plain function instead of the Prefect flow, which would start a Prefect server, and the
    # fixture's instruct output in place of one this profile produced.
    monkeypatch.setattr(pipeline, "run_stage_flow", run_stage)
    monkeypatch.setattr(stage, "resolve_upstream", lambda _stage, _profile: {"instruct": instruct})
    config = tmp_path / "profile.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nmlflow_config: {tracking}\n"
                      f"judge: {{host: '{closed_port_url()}', optional: true}}\n")
    cli.main(["stage", "judge", "--config", str(config)])
    out = capsys.readouterr().out
    assert out.startswith("judge: skipped (Ollama is not reachable at") and "`ollama serve`" in out


def test_model_not_pulled_and_optional_skips_with_how_to_pull_it(instruct, tracking, tmp_path):
    with OllamaStub(models=()) as stub:
        result = run_stage("judge", make_profile(tmp_path, tracking, host=stub.url, optional=True), {"instruct": instruct})
    assert result["skipped"] is True and "`ollama pull llama3`" in result["reason"]
    assert stub.chats == []


def test_changed_responses_file_is_refused(instruct, tracking, tmp_path):
    with open(instruct["outputs"]["responses"], "a") as f:
        f.write(" ")
    with pytest.raises(GptflowError, match="changed since the instruct stage wrote it"):
        run_stage("judge", make_profile(tmp_path, tracking), {"instruct": instruct})
