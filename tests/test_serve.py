"""`gptflow serve` as a real process, driven by the official `ollama` and `openai` clients.

One server for the module: a random gpt-nano saved as an alpaca instruction model (1024-token
context, so a long generation is easy to ask for). Greedy answers must equal `gptflow ask`'s.
"""

import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
from servers import free_port
from serving import ROOT, gptflow_serve, save_tiny_instruct_model, status

ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")

NAME = "tiny:latest"
INSTRUCTIONS = ["Name a colour.", "What is 2+2?", "Say hi", "Translate 'cat' into French.",
                "List three fruits, please.", "Why is the sky blue?", "Summarise: the cat sat on the mat.",
                "Write one word."]
TOKENS = 12
DEADLINE = 120  # seconds: only a hang reaches it


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_instruct_model(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    with gptflow_serve(model_dir, log, "--max-batch", "8", "--max-concurrency", "32") as url:
        yield url
    assert "Traceback" not in log.read_text(), log.read_text()  # disconnects and bad requests included


@pytest.fixture(scope="module")
def asked(model_dir):
    """`gptflow ask`'s answer to each instruction (in-process, as the CLI runs it)."""
    from flows.cli import main

    answers = {}
    for instruction in INSTRUCTIONS:
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["ask", "--model", str(model_dir), "--max-new-tokens", str(TOKENS), instruction])
        answers[instruction] = out.getvalue().removesuffix("\n")
    return answers


def ollama_client(url):
    return ollama.Client(host=url, timeout=DEADLINE)


def openai_client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="not-checked", timeout=DEADLINE, max_retries=0)


def wait_idle(url):
    deadline = time.monotonic() + DEADLINE
    while (now := status(url))["admitted"] or now["running"]:
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
    return now


def test_clients_list_and_show_the_model(server):
    listed = ollama_client(server).list().models
    assert [m.model for m in listed] == [NAME]
    assert len(listed[0].digest) == 64 and listed[0].details.family == "gpt2"
    shown = ollama_client(server).show("tiny")
    assert shown.modelinfo["gpt2.context_length"] == 1024 and "### Instruction:" in shown.template
    assert [m.id for m in openai_client(server).models.list()] == [NAME]
    assert requests.get(f"{server}/api/version", timeout=10).json()["version"]


def test_greedy_answers_equal_ask_over_every_endpoint(server, asked):
    ol, oa = ollama_client(server), openai_client(server)
    greedy = {"temperature": 0, "num_predict": TOKENS}
    for instruction in INSTRUCTIONS[:3]:
        expected = asked[instruction]
        messages = [{"role": "user", "content": instruction}]
        chat = ol.chat(model=NAME, messages=messages, options=greedy)
        assert chat.message.content == expected and chat.done_reason in ("stop", "length")
        assert "".join(part.message.content for part in ol.chat(model="tiny", messages=messages, options=greedy,
                                                                 stream=True)) == expected
        assert ol.generate(model=NAME, prompt=instruction, options=greedy).response == expected
        assert "".join(p.response for p in ol.generate(model=NAME, prompt=instruction, options=greedy,
                                                       stream=True)) == expected
        completion = oa.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=TOKENS)
        assert completion.choices[0].message.content == expected
        assert completion.usage.completion_tokens <= TOKENS and completion.usage.prompt_tokens > 20
        chunks = list(oa.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=TOKENS,
                                                 stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[-1].usage.total_tokens == completion.usage.total_tokens


def test_plain_completion_equals_gptflow_generate(server, model_dir, run_cli):
    prompt = "Every effort moves you"
    code, out, err = run_cli("generate", "--model", str(model_dir), "--max-new-tokens", "10", prompt)
    assert code == 0, err
    expected = out.removesuffix("\n")[len(prompt):]
    oa = openai_client(server)
    assert oa.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=10).choices[0].text == expected
    streamed = oa.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    raw = ollama_client(server).generate(model=NAME, prompt=prompt, raw=True,
                                         options={"temperature": 0, "num_predict": 10})
    assert raw.response == expected


def test_seeded_sampling_repeats_and_stop_strings_cut(server):
    ol = ollama_client(server)
    sampled = {"temperature": 1.0, "seed": 42, "num_predict": TOKENS}
    first = ol.generate(model=NAME, prompt="Say hi", options=sampled).response
    assert ol.generate(model=NAME, prompt="Say hi", options=sampled).response == first
    full = ol.generate(model=NAME, prompt="Say hi", options={"temperature": 0, "num_predict": TOKENS}).response
    # The latest two characters (no whitespace) that occur there first: the answer is cut before them.
    stop = next(full[k:k + 2] for k in range(len(full) - 2, 0, -1)
                if full[k:k + 2].strip() == full[k:k + 2] and full.index(full[k:k + 2]) == k)
    cut = ol.generate(model=NAME, prompt="Say hi", options={"temperature": 0, "num_predict": TOKENS, "stop": [stop]})
    assert cut.response == full[:full.index(stop)].rstrip() and cut.done_reason == "stop"


def test_32_concurrent_streams_each_equal_its_sequential_answer(server):
    wait_idle(server)
    jobs = [(i, INSTRUCTIONS[i % len(INSTRUCTIONS)] + " " * (i // len(INSTRUCTIONS))) for i in range(32)]
    # Trailing spaces make 32 distinct prompts (of a few lengths) out of 8 instructions.

    def ask(i, instruction, stream):
        if i % 2:
            chunks = openai_client(server).chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": instruction}], temperature=0,
                max_tokens=TOKENS, stream=stream)
            if not stream:
                return chunks.choices[0].message.content
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        parts = ollama_client(server).chat(model=NAME, messages=[{"role": "user", "content": instruction}],
                                           options={"temperature": 0, "num_predict": TOKENS}, stream=stream)
        return "".join(p.message.content for p in parts) if stream else parts.message.content

    sequential = [ask(i, instruction, stream=False) for i, instruction in jobs]
    before = status(server)
    with ThreadPoolExecutor(max_workers=32) as pool:
        concurrent = list(pool.map(lambda job: ask(*job, stream=True), jobs))
    assert concurrent == sequential
    after = wait_idle(server)
    assert after["completed"] - before["completed"] == 32 and after["failed"] == 0
    assert after["largest_batch"] > 1  # requests that overlapped were decoded together


def post(url, path, body: bytes, **headers):
    return requests.post(url + path, data=body, headers={"Content-Type": "application/json", **headers},
                         timeout=DEADLINE)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_bad_requests_get_4xx_in_the_apis_shape_and_serving_goes_on(server, path):
    openai_shape = path.startswith("/v1")

    def message(reply):
        error = reply.json()["error"]
        if openai_shape:
            assert set(error) == {"message", "type", "param", "code"}
            return error["message"]
        assert isinstance(error, str)
        return error

    messages = [{"role": "user", "content": "Say hi"}]
    huge = post(server, path, b'{"model": "tiny", "messages": [], "pad": "' + b"x" * 10_000_000 + b'"}')
    assert huge.status_code == 413 and "larger than" in message(huge)
    malformed = post(server, path, b'{"model": "tiny", "messages": [')
    assert malformed.status_code == 400 and "not valid JSON" in message(malformed)
    too_many = {"max_tokens": 10**9} if openai_shape else {"options": {"num_predict": 10**9}}
    greedy = post(server, path, json.dumps({"model": NAME, "messages": messages, "stream": False, **too_many}).encode())
    assert greedy.status_code == 400 and "context of 1024" in message(greedy)
    unknown = post(server, path, json.dumps({"model": "llama3", "messages": messages, "stream": False}).encode())
    assert unknown.status_code == 404 and "llama3" in message(unknown)
    typed = post(server, path, json.dumps({"model": NAME, "messages": "hi", "stream": False}).encode())
    assert typed.status_code == 400
    if openai_shape:
        assert typed.json()["error"]["param"] == "messages"
    # Still serving.
    fine = post(server, path, json.dumps({"model": NAME, "messages": messages, "stream": False, "temperature": 0,
                                          "max_tokens": 3, "options": {"num_predict": 3}}).encode())
    assert fine.status_code == 200


def test_a_prompt_that_fills_the_context_is_refused_and_a_limit_is_clamped(server):
    oa = openai_client(server)
    with pytest.raises(openai.BadRequestError, match="no room"):
        oa.completions.create(model=NAME, prompt=" word" * 1100, max_tokens=5)
    # 1000 prompt tokens leave 24: max_tokens 500 is within the context, so it is clamped.
    clamped = oa.completions.create(model=NAME, prompt=" word" * 1000, max_tokens=500, temperature=0)
    assert clamped.usage.completion_tokens <= 24 and clamped.choices[0].finish_reason in ("length", "stop")
    with pytest.raises(ollama.ResponseError, match="not found") as error:
        ollama_client(server).chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 404


LONG = 990  # the prompt leaves 994 of the 1024-token context


def start_stream(url, path, body):
    """A raw streaming request; returns its socket once the first chunk of the answer is in."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=DEADLINE)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline()  # the first NDJSON line / SSE event: the request is admitted
    return connection.sock


@pytest.mark.parametrize("path, body", [
    ("/api/generate", {"model": NAME, "prompt": "Tell a long story.",
                       "options": {"temperature": 0, "num_predict": LONG}}),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "Tell a long story."}],
                              "temperature": 0, "max_tokens": LONG, "stream": True}),
])
def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, path, body):
    before = wait_idle(server)
    sock = start_stream(server, path, body)
    assert status(server)["admitted"] == 1
    sock.shutdown(socket.SHUT_RDWR)  # the client goes away without reading on
    sock.close()
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completed"] == before["completed"]  # stopped, not run to its 990 tokens


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slot(server):
    before = wait_idle(server)
    body = {"model": NAME, "prompt": "Tell a long story.", "stream": False,
            "options": {"temperature": 0, "num_predict": LONG}}
    with pytest.raises(requests.Timeout):
        requests.post(f"{server}/api/generate", json=body, timeout=(DEADLINE, 0.2))
    after = wait_idle(server)
    assert after["cancelled"] == before["cancelled"] + 1


def test_busy_server_refuses_in_each_apis_shape(model_dir, tmp_path):
    # In-process: admissions are filled directly, so nothing depends on timing.
    from fastapi.testclient import TestClient

    from flows.serve import create_app, prepare_model
    from gpt_core.scheduler import BatchScheduler, Request
    from gpt_core.tokenizer import get_tokenizer

    served = prepare_model(str(model_dir))
    scheduler = BatchScheduler(served.model, get_tokenizer(), max_pending=1)  # never started
    scheduler.submit(Request([1, 2, 3], 1), lambda update: None)
    with TestClient(create_app(served, get_tokenizer(), scheduler, own_scheduler=False)) as client:
        messages = [{"role": "user", "content": "hi"}]
        busy = client.post("/api/chat", json={"model": NAME, "messages": messages, "stream": False})
        assert busy.status_code == 503 and busy.json()["error"].startswith("server busy")
        limited = client.post("/v1/chat/completions", json={"model": NAME, "messages": messages})
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert limited.headers["retry-after"] == "1"


def test_classifiers_are_refused_in_one_line(tmp_path, run_cli):
    import torch

    from gpt_core.classifier import add_classification_head
    from gpt_core.config import get_preset
    from gpt_core.model import GPTModel
    from gpt_core.weights import save_model

    torch.manual_seed(0)
    folder = save_model(add_classification_head(GPTModel(get_preset("gpt-nano")), 2), tmp_path / "spam",
                        extra={"labels": ["ham", "spam"]})
    code, out, err = run_cli("chat", "--model", str(folder))
    assert code == 2 and err.count("\n") == 1 and "is a classifier (2 classes)" in err
    # serve in a process of its own: were the refusal broken, it would serve instead of returning.
    served = subprocess.run([sys.executable, "-m", "flows.cli", "serve", "--model", str(folder), "--port",
                             str(free_port())], capture_output=True, text=True, timeout=DEADLINE, cwd=ROOT)
    assert served.returncode == 2 and served.stderr.count("\n") == 1 and "is a classifier" in served.stderr
