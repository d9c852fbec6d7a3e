import json
import socket

import pytest
import requests
from ollama_stub import DIGEST, OllamaStub

from gpt_core.errors import GptflowError
from gpt_core.judge import (
    PROMPT_VERSION,
    REMINDER,
    JudgeClient,
    judge_prompt,
    parse_score,
    summarize,
)

ENTRIES = [
    {"instruction": "Rewrite in passive voice.", "input": "The chef cooks the meal.",
     "output": "The meal is cooked by the chef."},
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Give an antonym of 'hot'.", "input": "", "output": "Cold."},
]
RESPONSES = ["The meal is cooked by the chef.", "Paris", "Warm."]


def client(stub, **kwargs):
    # Small timeouts and backoff keep the retry tests fast.
    kwargs = {"timeout": 2.0, "retries": 2, "backoff": 0.01, **kwargs}
    return JudgeClient(stub.url, **kwargs)


@pytest.mark.parametrize(
    "reply, score",
    [("85", 85), (" 85\n", 85), ("Score: 85", 85), ("85/100", 85), ("0", 0), ("100", 100),
     ("eighty", None), ("150", None), ("85 or 90", None), ("-5", None), ("", None)],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_judge_prompt_is_the_books():
    assert judge_prompt(ENTRIES[1], "Paris") == (
        "Given the input `Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nName the capital of France.` "
        "and correct output `Paris.`, score the model response `Paris` on a scale from 0 to 100, "
        "where 100 is the best score. Respond with the integer number only."
    )


def test_host_defaults_like_ollama(monkeypatch):
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    assert JudgeClient().host == "http://localhost:11434"
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:11500")
    assert JudgeClient().host == "http://127.0.0.1:11500"
    assert JudgeClient("myhost").host == "http://myhost:11434"
    assert JudgeClient("https://judge.example/").host == "https://judge.example"


def test_scores_parsed_with_the_books_request():
    with OllamaStub(reply=lambda prompt: "90" if "Paris" in prompt else "Score: 40") as stub:
        judgements = client(stub).score_all(ENTRIES, RESPONSES)
    assert [j.score for j in judgements] == [40, 90, 40]
    assert all(j.judge_model == "llama3" and j.prompt_version == PROMPT_VERSION for j in judgements)
    assert all(not j.cached and j.error is None for j in judgements)
    body = stub.chats[0]
    assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}
    assert body["stream"] is False
    assert body["model"] == "llama3"
    prompts = sorted(b["messages"][0]["content"] for b in stub.chats)
    assert prompts == sorted(judge_prompt(e, r) for e, r in zip(ENTRIES, RESPONSES))
    assert summarize(judgements) == {
        "mean_score": pytest.approx(170 / 3), "mean_score_judged": pytest.approx(170 / 3),
        "n_scored": 3, "n_empty": 0, "n_unscored": 0, "n_total": 3,
    }


def test_server_errors_are_retried():
    with OllamaStub(reply="77") as stub:
        stub.fail_next = 2
        assert client(stub, retries=2).chat("score this") == "77"
    assert len(stub.chats) == 3


def test_dropped_connection_is_retried():
    with OllamaStub(reply="77") as stub:
        stub.drop_next = 1
        assert client(stub).chat("score this") == "77"
    assert len(stub.chats) == 2


def test_client_errors_are_not_retried():
    with OllamaStub() as stub:
        judge = client(stub, model="llama3")
        judge.model = "mistral"  # as if the model vanished after check()
        with pytest.raises(GptflowError, match="HTTP 404"):
            judge.chat("score this")
    assert len(stub.chats) == 1


def test_slow_server_times_out_retries_then_records_unscored():
    with OllamaStub() as stub:
        stub.delay = 5.0
        judgements = client(stub, timeout=0.1, retries=1).score_all(ENTRIES[:1], RESPONSES[:1])
    (judgement,) = judgements
    assert judgement.score is None
    assert "2 attempts" in judgement.error and "no answer within 0.1 s" in judgement.error
    assert len(stub.chats) == 2
    assert summarize(judgements)["n_unscored"] == 1


def test_garbage_is_reasked_once_then_unscored():
    with OllamaStub(reply="The response is quite good.") as stub:
        judgements = client(stub).score_all(ENTRIES[:1], RESPONSES[:1])
    assert len(stub.chats) == 2
    first, second = (b["messages"][0]["content"] for b in stub.chats)
    assert second == first + REMINDER
    (judgement,) = judgements
    assert judgement.score is None and judgement.reply == "The response is quite good."
    assert "not a single integer" in judgement.error
    assert summarize(judgements) == {
        "mean_score": None, "mean_score_judged": None, "n_scored": 0, "n_empty": 0, "n_unscored": 1,
        "n_total": 1,
    }


def test_reask_that_parses_is_scored():
    with OllamaStub(reply=lambda p: "60" if p.endswith(REMINDER) else "pretty good") as stub:
        (judgement,) = client(stub).score_all(ENTRIES[:1], RESPONSES[:1])
    assert judgement.score == 60 and len(stub.chats) == 2


def test_empty_response_scores_zero_without_asking():
    with OllamaStub() as stub:
        judgements = client(stub).score_all(ENTRIES[:2], ["", "  \n"])
    assert [j.score for j in judgements] == [0, 0]
    assert stub.requests == []
    assert summarize(judgements) == {
        "mean_score": 0, "mean_score_judged": None, "n_scored": 2, "n_empty": 2, "n_unscored": 0, "n_total": 2,
    }


def test_empty_responses_are_counted_apart_from_judged_ones():
    with OllamaStub(reply="80") as stub:
        judgements = client(stub).score_all(ENTRIES[:2], ["", RESPONSES[1]])
    summary = summarize(judgements)
    assert (summary["mean_score"], summary["mean_score_judged"], summary["n_empty"]) == (40, 80, 1)


def test_cache_avoids_repeat_requests(tmp_path):
    cache = tmp_path / "judge-cache.jsonl"
    with OllamaStub(reply="70") as stub:
        first = client(stub).score_all(ENTRIES, RESPONSES, cache)
        assert len(stub.chats) == 3
        second = client(stub).score_all(ENTRIES, RESPONSES, cache)
        assert len(stub.chats) == 3
    assert [j.score for j in second] == [j.score for j in first] == [70, 70, 70]
    assert all(j.cached for j in second)


def test_rerun_after_partial_failure_asks_only_for_the_missing(tmp_path):
    cache = tmp_path / "judge-cache.jsonl"
    with OllamaStub(reply=lambda p: "garbage" if "Paris" in p else "55") as stub:
        first = client(stub).score_all(ENTRIES, RESPONSES, cache)
        assert [j.score for j in first] == [55, None, 55]
        asked = len(stub.chats)
        stub.reply = "95"
        second = client(stub).score_all(ENTRIES, RESPONSES, cache)
    assert [j.score for j in second] == [55, 95, 55]
    assert [j.cached for j in second] == [True, False, True]
    (retried,) = stub.chats[asked:]
    assert "Paris" in retried["messages"][0]["content"]


def test_cache_tolerates_a_torn_last_line(tmp_path):
    cache = tmp_path / "judge-cache.jsonl"
    with OllamaStub(reply="70") as stub:
        client(stub).score_all(ENTRIES[:1], RESPONSES[:1], cache)
        with cache.open("a", encoding="utf-8") as out:
            out.write('{"key": "abc", "score": 4')  # a crash mid-write
        judgements = client(stub).score_all(ENTRIES, RESPONSES, cache)
        assert [j.cached for j in judgements] == [True, False, False]
        assert len(stub.chats) == 3
        again = client(stub).score_all(ENTRIES, RESPONSES, cache)
    assert all(j.cached for j in again)
    lines = cache.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines if '"abc"' not in line)


def test_cache_key_depends_on_judge_model(tmp_path):
    cache = tmp_path / "judge-cache.jsonl"
    with OllamaStub(reply="70", models=["llama3:latest", "llama3:70b"]) as stub:
        client(stub).score_all(ENTRIES[:1], RESPONSES[:1], cache)
        (judgement,) = client(stub, model="llama3:70b").score_all(ENTRIES[:1], RESPONSES[:1], cache)
    assert not judgement.cached and len(stub.chats) == 2


def test_max_in_flight_is_respected():
    entries, responses = ENTRIES * 2, RESPONSES * 2
    with OllamaStub() as stub:
        stub.delay = 0.1
        judgements = client(stub, max_in_flight=2).score_all(entries, responses)
    assert len(stub.chats) == 6 and all(j.score == 85 for j in judgements)
    assert stub.max_concurrent == 2


def test_down_server_says_to_start_ollama():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = JudgeClient(f"127.0.0.1:{port}", timeout=1.0)
    with pytest.raises(GptflowError, match="not reachable at http://127.0.0.1:.*`ollama serve`"):
        judge.check()
    with pytest.raises(GptflowError, match="`ollama serve`"):
        judge.score_all(ENTRIES[:1], RESPONSES[:1])


def test_missing_model_says_to_pull_it():
    with OllamaStub(models=[]) as stub:
        with pytest.raises(GptflowError, match=r"no model 'llama3': run `ollama pull llama3`"):
            client(stub).check()
        with pytest.raises(GptflowError, match="ollama pull llama3"):
            client(stub).score_all(ENTRIES[:1], RESPONSES[:1])
    assert stub.chats == []


def test_model_name_matches_latest_tag():
    with OllamaStub(models=["llama3:latest", "phi3:mini"]) as stub:
        client(stub).check()
        client(stub, model="llama3:latest").check()
        client(stub, model="phi3:mini").check()
        with pytest.raises(GptflowError, match="ollama pull phi3"):
            client(stub, model="phi3").check()


def test_mismatched_lengths_are_a_clear_error():
    with pytest.raises(GptflowError, match="one model response per test entry"):
        JudgeClient("127.0.0.1:1").score_all(ENTRIES, RESPONSES[:1])


def test_cache_is_keyed_by_the_digest_the_server_reports(tmp_path):
    cache = tmp_path / "judge-cache.jsonl"
    with OllamaStub(reply="70") as stub:
        first = client(stub).score_all(ENTRIES[:1], RESPONSES[:1], cache)
        stub.digests["llama3:latest"] = "f" * 64  # `ollama pull llama3` brought new weights
        (repulled,) = client(stub).score_all(ENTRIES[:1], RESPONSES[:1], cache)
        del stub.digests["llama3:latest"]
        (back,) = client(stub).score_all(ENTRIES[:1], RESPONSES[:1], cache)
    assert not repulled.cached and back.cached and len(stub.chats) == 2
    assert first[0].judge_identity == f"ollama:llama3:latest@sha256:{DIGEST}" == back.judge_identity
    assert repulled.judge_identity == "ollama:llama3:latest@sha256:" + "f" * 64


def test_api_key_comes_from_the_named_variable_and_stays_out_of_the_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with pytest.raises(GptflowError, match=r"\$JUDGE_TEST_KEY, which is not set"):
        JudgeClient("127.0.0.1:1", api_key_env="JUDGE_TEST_KEY")
    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-secret-123")
    cache = tmp_path / "judge-cache.jsonl"
    with OllamaStub(reply="70") as stub:
        client(stub, api_key_env="JUDGE_TEST_KEY").score_all(ENTRIES[:1], RESPONSES[:1], cache)
    assert {r["headers"].get("Authorization") for r in stub.requests} == {"Bearer sk-secret-123"}
    assert "sk-secret" not in cache.read_text()


def test_unknown_api_is_refused():
    with pytest.raises(GptflowError, match="ollama, openai"):
        JudgeClient(api="anthropic")


def test_openai_base_url_defaults(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert JudgeClient(api="openai").base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "127.0.0.1:8000/v1/")
    assert JudgeClient(api="openai").base_url == "http://127.0.0.1:8000/v1"
    assert JudgeClient(api="openai").options == {"seed": 123, "temperature": 0.0}


# --- against a real `gptflow serve` -----------------------------------------------------------

@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    """Two gptflow serve processes, each serving a model named "judge": one always answers 85,
    the other 40 (different weights, so a different digest)."""
    from serving import gptflow_servers, save_answering_model

    from gpt_core.tokenizer import get_tokenizer
    folder = tmp_path_factory.mktemp("judges")
    tokenizer = get_tokenizer()
    servers = []
    for score in ("85", "40"):
        (token,) = tokenizer.encode(score)
        model = save_answering_model(folder / score / "judge", token)
        servers.append((model, folder / f"serve-{score}.log", ()))
    with gptflow_servers(*servers) as urls:
        yield dict(zip(("85", "40"), urls))


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_judge_scores_against_gptflow_serve_and_reuses_only_the_same_judges_scores(judges, api, tmp_path):
    from serving import status

    def judge(url):
        base = url if api == "ollama" else f"{url}/v1"
        return JudgeClient(base, "judge", api=api, timeout=60, retries=0)

    cache = tmp_path / "judge-cache.jsonl"
    first = judge(judges["85"]).score_all(ENTRIES, RESPONSES, cache)
    assert [j.score for j in first] == [85, 85, 85] and not any(j.cached for j in first)
    asked = status(judges["85"])["completed"]
    again = judge(judges["85"]).score_all(ENTRIES, RESPONSES, cache)
    assert [j.score for j in again] == [85, 85, 85] and all(j.cached for j in again)
    assert status(judges["85"])["completed"] == asked  # nothing was asked the second time
    other = judge(judges["40"]).score_all(ENTRIES, RESPONSES, cache)
    assert [j.score for j in other] == [40, 40, 40] and not any(j.cached for j in other)
    assert first[0].judge_identity != other[0].judge_identity
    if api == "ollama":  # the same name, told apart by the digest serve reports
        digest = requests.get(f"{judges['85']}/api/tags", timeout=10).json()["models"][0]["digest"]
        assert first[0].judge_identity == f"ollama:judge:latest@sha256:{digest}"
    else:
        assert first[0].judge_identity == f"openai:judge:latest@{judges['85']}/v1"


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_judge_stage_end_to_end_over_gptflow_serve(judges, api, tmp_path, tracking):
    """The pipeline's judge stage scores the instruct stage's answers through a real server."""
    import json

    from flows.judge import Config as JudgeConfig
    from flows.settings import profile_model
    from flows.stage import run_stage
    from gpt_core.files import sha256_file

    answers = tmp_path / "responses.json"
    answers.write_text(json.dumps([{**e, "model_response": r} for e, r in zip(ENTRIES, RESPONSES)]))
    instruct = {"stage": "instruct", "key": "0123456789abcdef", "mlflow_run_id": None,
                "outputs": {"responses": str(answers), "responses_sha256": sha256_file(answers)}}

    def profile(score):
        base = judges[score] if api == "ollama" else f"{judges[score]}/v1"
        return profile_model()(data_dir=tmp_path / "data", mlflow_config=tracking,
                               judge=JudgeConfig(api=api, host=base, model="judge", retries=0))

    first = run_stage("judge", profile("85"), {"instruct": instruct})
    assert first["metrics"]["mean_score"] == 85 and first["metrics"]["n_scored"] == 3
    assert run_stage("judge", profile("85"), {"instruct": instruct})["cached"] is True
    other = run_stage("judge", profile("40"), {"instruct": instruct})
    assert other["cached"] is False and other["metrics"]["mean_score"] == 40 and other["metrics"]["n_cached"] == 0
    assert other["outputs"]["judge_identity"] != first["outputs"]["judge_identity"]
