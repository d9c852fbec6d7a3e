"""An Ollama-API-compatible HTTP server for tests: /api/tags and non-streaming /api/chat.

Real sockets on 127.0.0.1, so the client's timeouts, retries and connection handling are
exercised exactly as against `ollama serve`. Faults are injected on /api/chat only, so check()
keeps working while the chat endpoint misbehaves.

    with OllamaStub(reply="85") as stub:
        JudgeClient(stub.url).chat("...")
        stub.chats  # every /api/chat request body
"""

import json
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DIGEST = "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1"


def _model_record(name: str, digest: str = DIGEST) -> dict:
    return {
        "name": name,
        "model": name,
        "modified_at": "2024-05-01T12:00:00.000000000Z",
        "size": 4661224676,
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "8.0B",
            "quantization_level": "Q4_0",
        },
    }


class OllamaStub:
    """Knobs (set any time, also while serving):

    reply      str, or a function of the last user message returning the reply text
    delay      seconds to wait before answering a chat request
    fail_next  answer the next N chat requests with HTTP 500
    drop_next  close the connection without a response for the next N chat requests
    models     names listed by /api/tags (empty: no models pulled)
    digests    name -> digest /api/tags reports (default: one digest for every name)
    """

    def __init__(self, reply: str | Callable[[str], str] = "85", models=("llama3:latest",)):
        self.reply = reply
        self.models = list(models)
        self.digests: dict[str, str] = {}
        self.delay = 0.0
        self.fail_next = 0
        self.drop_next = 0
        self.requests: list[dict] = []  # {"method", "path", "body", "headers"} for every request
        self.max_concurrent = 0
        self._active = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval: shutdown() waits for the serving loop's next poll.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def chats(self) -> list[dict]:
        return [r["body"] for r in self.requests if r["path"] == "/api/chat"]

    def __enter__(self) -> "OllamaStub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()  # wakes handlers sleeping in `delay`
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _take(self, knob: str) -> bool:
        with self._lock:
            if getattr(self, knob) > 0:
                setattr(self, knob, getattr(self, knob) - 1)
                return True
            return False

    def _chat(self, handler: "BaseHTTPRequestHandler", body: dict) -> None:
        with self._lock:
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
        try:
            if self._take("drop_next"):
                handler.close_connection = True  # no status line: the client sees a dropped socket
                return
            if self._take("fail_next"):
                handler.send_json(500, {"error": "stub: internal server error"})
                return
            if body.get("stream") is not False:
                handler.send_json(400, {"error": "stub: only non-streaming chat is supported"})
                return
            model = str(body.get("model"))
            if (model if ":" in model else f"{model}:latest") not in self.models:
                handler.send_json(
                    404, {"error": f"model \"{model}\" not found, try pulling it first"}
                )
                return
            self._stopping.wait(self.delay)
            prompt = body["messages"][-1]["content"]
            content = self.reply(prompt) if callable(self.reply) else self.reply
            handler.send_json(200, {
                "model": body["model"],
                "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
                "message": {"role": "assistant", "content": content},
                "done_reason": "stop",
                "done": True,
                "total_duration": 1_000_000,
                "load_duration": 100_000,
                "prompt_eval_count": len(prompt.split()),
                "prompt_eval_duration": 100_000,
                "eval_count": 2,
                "eval_duration": 100_000,
            })
        finally:
            with self._lock:
                self._active -= 1


def _handler_for(stub: OllamaStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Ollama: pooled client connections get reused

        def _record(self, body) -> None:
            with stub._lock:
                stub.requests.append({"method": self.command, "path": self.path, "body": body,
                                      "headers": dict(self.headers)})

        def send_json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up (timed out) before the answer came
                self.close_connection = True

        def do_GET(self) -> None:
            self._record(None)
            if self.path == "/api/tags":
                self.send_json(200, {"models": [_model_record(m, stub.digests.get(m, DIGEST))
                                                for m in stub.models]})
            else:
                self.send_json(404, {"error": "not found"})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw or b"{}")
            self._record(body)
            if self.path == "/api/chat":
                stub._chat(self, body)
            else:
                self.send_json(404, {"error": "not found"})

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

    return Handler
