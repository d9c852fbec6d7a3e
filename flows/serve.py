"""`gptflow serve`: one model behind Ollama's API and an OpenAI-compatible one (FastAPI + uvicorn).

    Ollama:  GET /api/tags, POST /api/show, POST /api/generate, POST /api/chat, GET /api/version,
             GET /api/ps. Streams NDJSON unless "stream": false, as Ollama does.
    OpenAI:  GET /v1/models, POST /v1/completions, POST /v1/chat/completions; server-sent events
             ending with "data: [DONE]" when "stream": true; usage counts.
    Ours:    GET /gptflow/status (the scheduler's queue and counters).

Generation runs on gpt_core.scheduler.BatchScheduler: one worker thread owns the model and
decodes the requests that are waiting as one batch (see its docstring). Chat messages are
rendered in the model's prompt style (config.json's `style`; gpt_core.prompts.format_chat) and
the answer cleaned as `gptflow ask` cleans it, so a greedy answer equals ask's for the same
instruction. A base language model (no style) continues the messages' text as plain completion.

Limits, chosen so that one client cannot hurt the others:
- request bodies over --max-body-bytes (1 MiB) get 413, without being buffered;
- max_tokens / num_predict above the model's context get 400; a smaller one that does not fit
  after the prompt is clamped to the room left (finish reason "length"), and a prompt that
  leaves no room gets 400. Generation never slides the window, so every batch keeps its cache;
- at most --max-concurrency requests are admitted at once (running or waiting for a batch);
  beyond that the Ollama API answers 503 "server busy" (as Ollama does) and the OpenAI API 429,
  both with Retry-After;
- a client that disconnects (streaming or not) has its generation stopped and its slot freed.
Errors come in each API's own shape: Ollama {"error": "..."}; OpenAI {"error": {"message",
"type", "param", "code"}}.

Sampling defaults are each API's own: Ollama temperature 0.8, top_k 40, top_p 0.9; OpenAI
temperature 1, top_p 1 (pass temperature 0 for greedy answers). Options without a meaning here
(num_ctx, penalties, keep_alive, ...) are accepted and ignored; features we lack (images, tools,
structured output, suffix, n > 1, logprobs) are refused with 400.
"""

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt_core.compiled import Compile, should_compile_decoding
from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.generate import Sampling
from gpt_core.prompts import format_chat, format_prompt
from gpt_core.scheduler import BatchScheduler, Busy, Update
from gpt_core.scheduler import Request as GenerationRequest
from gpt_core.tokenizer import END_OF_TEXT_ID
from gpt_core.weights import CONFIG_FILE, WEIGHTS_FILE, load_language_model

log = logging.getLogger("gptflow")

DEFAULT_PORT = 11435  # Ollama's 11434 plus one, so both can run on one machine
MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20  # an oversized body is read and dropped up to this, so the client sees the 413
MAX_STOPS = 16
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}


def gptflow_version() -> str:
    try:
        return version("gptflow")
    except PackageNotFoundError:
        return "0.0.0"


# --- the model -------------------------------------------------------------------------------

def _clean_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"


def registered_name(spec: str) -> str | None:
    """models:/NAME@ALIAS (or models:/NAME/VERSION) as an Ollama-style NAME:ALIAS; else None."""
    match = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/([^/]+))?", spec)
    if not match:
        return None
    return f"{_clean_name(match.group(1))}:{_clean_name(match.group(2) or match.group(3) or 'latest')}"


def default_name(folder: Path) -> str:
    return f"{_clean_name(Path(folder).name)}:latest"


def model_digest(folder: Path) -> str:
    """sha256 over the weights' and config.json's own sha256: stable for the same model files."""
    parts = [sha256_file(folder / WEIGHTS_FILE), sha256_file(folder / CONFIG_FILE)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class ServedModel:
    name: str  # NAME:TAG
    model: object  # GPTModel
    config: dict
    folder: Path
    digest: str
    style: str | None
    size: int
    modified_at: str

    @property
    def context(self) -> int:
        return self.model.cfg.context_length

    def matches(self, requested: str) -> bool:
        """Ollama's rule: a name without a tag means :latest."""
        requested = requested if ":" in requested else f"{requested}:latest"
        return requested == self.name


def _dumps(payload) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def _rfc3339(seconds: float | None = None) -> str:
    moment = datetime.fromtimestamp(seconds if seconds is not None else time.time(), timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def prepare_model(spec: str, *, name: str | None = None, device="cpu") -> ServedModel:
    model, config, folder = load_language_model(spec, device)
    name = name or default_name(folder)
    if ":" not in name:
        name += ":latest"
    weights = folder / WEIGHTS_FILE
    return ServedModel(name=name, model=model, config=config, folder=folder, digest=model_digest(folder),
                       style=config.get("style"), size=weights.stat().st_size,
                       modified_at=_rfc3339(weights.stat().st_mtime))


def _parameter_size(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return str(count)


def _details(served: ServedModel) -> dict:
    dtype = str(next(served.model.parameters()).dtype).removeprefix("torch.")
    return {"parent_model": "", "format": "safetensors", "family": "gpt2", "families": ["gpt2"],
            "parameter_size": _parameter_size(served.model.num_parameters()),
            "quantization_level": {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}.get(dtype, dtype)}


# --- errors ----------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def _is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(path: str, error: ApiError) -> JSONResponse:
    if _is_openai(path):
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    else:
        body = {"error": error.message}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def busy_error(path: str, message: str) -> ApiError:
    if _is_openai(path):
        return ApiError(429, message, code="rate_limit_exceeded", kind="rate_limit_error",
                        headers={"Retry-After": "1"})
    return ApiError(503, f"server busy, please try again. {message}", headers={"Retry-After": "1"})


class BodyLimit:
    """ASGI middleware: bodies over `limit` bytes get 413 in the API's error shape, unbuffered.

    The oversized body is still read (and dropped, up to DRAIN_BYTES) before answering: a server
    that answers and closes while the client is still sending makes the client see a reset
    connection instead of the 413.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send, 0)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge(message.get("more_body", False))
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except _TooLarge as exc:
            if started:
                raise
            await self._refuse(scope, receive, send, received, exc.more)

    async def _refuse(self, scope, receive, send, received: int, more: bool = True):
        while more and received < DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            more = message.get("more_body", False)
        error = ApiError(413, f"the request body is larger than this server takes ({self.limit} bytes)",
                         code="request_too_large")
        response = error_response(scope["path"], error)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class _TooLarge(Exception):
    def __init__(self, more: bool):
        self.more = more


# --- request parsing -------------------------------------------------------------------------

async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _get(body: dict, key: str, kind: type, default=None, *, param: str | None = None):
    """body[key] checked to be of `kind` (JSON's numbers: 2.0 is an integer, true is not a number)."""
    value = body.get(key)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        names = {str: "a string", int: "an integer", float: "a finite number", bool: "true or false",
                 list: "a list", dict: "an object"}
        raise ApiError(400, f"'{param or key}' must be {names[kind]}, got {json.dumps(value)[:80]}",
                       param=param or key)
    return value


def _stops(value, param: str) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"'{param}' must be a string or a list of strings", param=param)
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"at most {MAX_STOPS} stop strings, got {len(stops)}", param=param)
    return tuple(stops)


def _sampling(temperature, top_k, top_p, seed, *, param_prefix="") -> Sampling:
    try:
        return Sampling(temperature, top_k, top_p, seed)
    except GptflowError as err:
        name = "temperature" if "temperature" in str(err) else "top_k" if "top-k" in str(err) else "top_p"
        raise ApiError(400, str(err), param=param_prefix + name) from None


class Server:
    """The routes' shared state: the model, the tokenizer and the scheduler."""

    def __init__(self, served: ServedModel, tokenizer, scheduler: BatchScheduler):
        self.served, self.tokenizer, self.scheduler = served, tokenizer, scheduler

    def encode(self, text: str) -> list[int]:
        # As `gptflow ask` encodes: a literal "<|endoftext|>" in a request is text, not the stop token.
        return self.tokenizer.encode(text, disallowed_special=())

    def check_model(self, requested, openai: bool):
        if not isinstance(requested, str) or not requested:
            raise ApiError(400, "'model' is required: the name of the model to use", param="model")
        if not self.served.matches(requested):
            message = (f"The model '{requested}' does not exist; this server has '{self.served.name}'" if openai
                       else f'model "{requested}" not found, try pulling it first')
            raise ApiError(404, message, param="model", code="model_not_found")

    def max_tokens(self, requested: int | None, prompt: list[int], *, param: str, prompt_param: str) -> int:
        """The new-token limit: the room left when unset; 400 above the context; clamped to the room."""
        context = self.served.context
        if len(prompt) >= context:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this model's context is {context} tokens, "
                                "which leaves no room for an answer", param=prompt_param,
                           code="context_length_exceeded")
        room = context - len(prompt)
        if requested is None:
            return room
        if requested > context:
            raise ApiError(400, f"'{param}' is {requested}, more than this model's context of {context} tokens",
                           param=param, code="context_length_exceeded")
        return min(requested, room)

    def submit(self, path: str, requests: list[GenerationRequest]) -> tuple[list, asyncio.Queue]:
        """Admit every request or none; updates arrive on the queue as (index, Update)."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        jobs = []

        def deliver(index):
            def on_update(update: Update):
                try:
                    loop.call_soon_threadsafe(updates.put_nowait, (index, update))
                except RuntimeError:  # the event loop is gone: the server is stopping
                    pass
            return on_update

        try:
            for index, generation in enumerate(requests):
                jobs.append(self.scheduler.submit(generation, deliver(index)))
        except Busy as err:
            for job in jobs:
                job.cancel()
            raise busy_error(path, str(err)) from None
        except GptflowError as err:
            for job in jobs:
                job.cancel()
            raise ApiError(400, str(err)) from None
        return jobs, updates


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _updates(request: Request, jobs: list, updates: asyncio.Queue, *, watch_disconnect: bool
                   ) -> AsyncIterator[tuple[int, Update]]:
    """(index, update) until every job is done; cancels what is left if the consumer stops early.

    With watch_disconnect, a client that goes away ends the iteration (a streaming response is
    cancelled by Starlette itself, so it needs no watcher).
    """
    watcher = asyncio.ensure_future(_until_disconnect(request)) if watch_disconnect else None
    left = len(jobs)
    try:
        while left:
            getter = asyncio.ensure_future(updates.get())
            waiting = {getter} | ({watcher} if watcher else set())
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return  # the client is gone
            index, update = getter.result()
            left -= update.done
            yield index, update
    finally:
        if watcher:
            watcher.cancel()
        for job in jobs:
            job.cancel()  # a no-op for a finished job


# --- the app ---------------------------------------------------------------------------------

def create_app(served: ServedModel, tokenizer, scheduler: BatchScheduler, *,
               max_body_bytes: int = MAX_BODY_BYTES, own_scheduler: bool = True) -> FastAPI:
    """The ASGI app; with own_scheduler it starts the scheduler on startup and closes it on shutdown."""
    @asynccontextmanager
    async def lifespan(_app):
        if own_scheduler:
            scheduler.start()
        yield
        if own_scheduler:
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="gptflow serve", version=gptflow_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    server = Server(served, tokenizer, scheduler)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError):
        return error_response(request.url.path, error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException):
        status = error.status_code
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(status, str(error.detail))
        return error_response(request.url.path, ApiError(status, message, code="not_found" if status == 404 else None))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception):
        log.exception("serve: %s %s failed", request.method, request.url.path)
        return error_response(request.url.path, ApiError(500, f"internal error: {type(error).__name__}: {error}",
                                                         kind="server_error"))

    @app.get("/")
    @app.head("/")
    async def root():
        return PlainTextResponse("gptflow is running (Ollama API under /api, OpenAI-compatible under /v1)")

    @app.get("/gptflow/status")
    async def status():
        return {"model": served.name, "digest": served.digest, **scheduler.status()}

    register_ollama(app, server)
    register_openai(app, server)
    return app


def _ollama_record(served: ServedModel) -> dict:
    return {"name": served.name, "model": served.name, "modified_at": served.modified_at, "size": served.size,
            "digest": served.digest, "details": _details(served)}


def _ollama_sampling(options: dict) -> tuple[Sampling, int | None, tuple[str, ...]]:
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object")
    values = {**OLLAMA_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    temperature = _get(values, "temperature", float, param="options.temperature")
    top_k = _get(values, "top_k", int, param="options.top_k")
    top_p = _get(values, "top_p", float, param="options.top_p")
    seed = _get(values, "seed", int, param="options.seed")
    num_predict = _get(values, "num_predict", int, param="options.num_predict")
    if num_predict is not None and num_predict < 0:
        if num_predict not in (-1, -2):
            raise ApiError(400, "options.num_predict must be -1 (no limit), -2 (fill the context) or >= 0, "
                                f"got {num_predict}")
        num_predict = None
    # Ollama (llama.cpp) reads top_k <= 0 and top_p >= 1 as "off".
    sampling = _sampling(temperature, top_k if top_k and top_k > 0 else None,
                         top_p if top_p is not None and top_p < 1 else None, seed, param_prefix="options.")
    return sampling, num_predict, _stops(values.get("stop"), "options.stop")


def _refuse_unsupported(body: dict, fields: dict[str, str]) -> None:
    for key, what in fields.items():
        if body.get(key) not in (None, "", [], False):
            raise ApiError(400, f"{what} are not supported by gptflow serve ('{key}')", param=key)


def _ns(timings: dict, key: str) -> int:
    return int(timings.get(key, 0))


def register_ollama(app: FastAPI, server: Server) -> None:
    served = server.served

    @app.get("/api/version")
    async def ollama_version():
        return {"version": gptflow_version()}

    @app.get("/api/tags")
    async def ollama_tags():
        return {"models": [_ollama_record(served)]}

    @app.get("/api/ps")
    async def ollama_ps():
        return {"models": [{**_ollama_record(served), "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": served.context}]}

    @app.post("/api/show")
    async def ollama_show(request: Request):
        body = await _json_body(request)
        server.check_model(body.get("model") or body.get("name"), openai=False)
        cfg = served.model.cfg
        if served.style:
            template = format_prompt({"instruction": "{{ .Prompt }}"}, served.style)
        else:
            template = "{{ .Prompt }}"
        return {
            "modelfile": f"# gptflow model from {served.folder}\nFROM {served.folder}\n",
            "parameters": 'stop "<|endoftext|>"',
            "template": template,
            "details": _details(served),
            "model_info": {"general.architecture": "gpt2", "general.parameter_count": served.model.num_parameters(),
                           "gpt2.context_length": cfg.context_length, "gpt2.embedding_length": cfg.emb_dim,
                           "gpt2.block_count": cfg.n_layers, "gpt2.attention.head_count": cfg.n_heads,
                           "gpt2.vocab_size": cfg.vocab_size, "gptflow.prompt_style": served.style,
                           "gptflow.digest": served.digest},
            "capabilities": ["completion"],
            "modified_at": served.modified_at,
        }

    def final_fields(update: Update) -> dict:
        t = update.timings
        return {"done": True, "done_reason": update.reason, "total_duration": _ns(t, "total"), "load_duration": 0,
                "prompt_eval_count": update.prompt_tokens, "prompt_eval_duration": _ns(t, "prompt"),
                "eval_count": update.completion_tokens, "eval_duration": _ns(t, "eval")}

    async def respond(request: Request, body: dict, generation: GenerationRequest,
                      piece: Callable[[str], dict], extra_final: Callable[[Update], dict]):
        stream = _get(body, "stream", bool, True)
        jobs, updates = server.submit(request.url.path, [generation])
        if not stream:
            text = []
            async with aclosing(_updates(request, jobs, updates, watch_disconnect=True)) as each:
                async for _, update in each:
                    if update.reason == "error":
                        raise ApiError(500, update.error or "generation failed", kind="server_error")
                    text.append(update.text)
                    if update.done:
                        return {"model": served.name, "created_at": _rfc3339(), **piece("".join(text)),
                                **final_fields(update), **extra_final(update)}
            return Response(status_code=499)  # the client is gone; nobody reads this

        async def lines():
            async with aclosing(_updates(request, jobs, updates, watch_disconnect=False)) as each:
                async for _, update in each:
                    if update.reason == "error":
                        yield _dumps({"error": update.error or "generation failed"}) + "\n"
                        return
                    if update.text:
                        yield _dumps({"model": served.name, "created_at": _rfc3339(), **piece(update.text),
                                      "done": False}) + "\n"
                    if update.done:
                        yield _dumps({"model": served.name, "created_at": _rfc3339(), **piece(""),
                                      **final_fields(update), **extra_final(update)}) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def loaded(piece: dict) -> dict:
        # An empty prompt or chat loads the model, as in Ollama: nothing is generated.
        return {"model": served.name, "created_at": _rfc3339(), **piece, "done": True, "done_reason": "load"}

    @app.post("/api/generate")
    async def ollama_generate(request: Request):
        body = await _json_body(request)
        server.check_model(body.get("model"), openai=False)
        _refuse_unsupported(body, {"images": "images", "format": "structured outputs", "suffix": "suffixes",
                                   "template": "custom templates", "think": "thinking models"})
        prompt = _get(body, "prompt", str, "")
        system = _get(body, "system", str, "")
        raw = _get(body, "raw", bool, False)
        context = _get(body, "context", list, [])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
            raise ApiError(400, "'context' must be a list of token ids")
        sampling, num_predict, stop = _ollama_sampling(_get(body, "options", dict, {}))
        if not prompt and not context:
            return loaded({"response": ""})
        style = None if raw else served.style
        if style:
            messages = [{"role": "system", "content": system}] if system else []
            text = format_chat(messages + [{"role": "user", "content": prompt}], style)
        else:
            text = (system + "\n" if system and not raw else "") + prompt
        ids = list(context) + server.encode(text)
        limit = server.max_tokens(num_predict, ids, param="options.num_predict", prompt_param="prompt")
        generation = GenerationRequest(ids, limit, sampling, stop, style)
        return await respond(request, body, generation, lambda text: {"response": text},
                             lambda update: {"context": ids + (update.tokens or [])})

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        body = await _json_body(request)
        server.check_model(body.get("model"), openai=False)
        _refuse_unsupported(body, {"tools": "tools", "format": "structured outputs", "think": "thinking models"})
        messages = _get(body, "messages", list, [])
        for message in messages:
            if isinstance(message, dict):
                _refuse_unsupported(message, {"images": "images", "tool_calls": "tool calls"})
        sampling, num_predict, stop = _ollama_sampling(_get(body, "options", dict, {}))
        if not messages:
            return loaded({"message": {"role": "assistant", "content": ""}})
        ids = server.encode(_render_chat(messages, served.style))
        limit = server.max_tokens(num_predict, ids, param="options.num_predict", prompt_param="messages")
        generation = GenerationRequest(ids, limit, sampling, stop, served.style)
        return await respond(request, body, generation,
                             lambda text: {"message": {"role": "assistant", "content": text}}, lambda update: {})


def _render_chat(messages: list, style: str | None) -> str:
    if not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a list of objects with a role and a content", param="messages")
    parsed = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        parsed.append({"role": m.get("role"), "content": content})
    try:
        return format_chat(parsed, style)
    except GptflowError as err:
        raise ApiError(400, str(err), param="messages") from None


def register_openai(app: FastAPI, server: Server) -> None:
    served = server.served
    created = int(Path(served.folder / WEIGHTS_FILE).stat().st_mtime)
    fingerprint = f"fp_{served.digest[:12]}"

    def model_record() -> dict:
        return {"id": served.name, "object": "model", "created": created, "owned_by": "gptflow"}

    @app.get("/v1/models")
    async def openai_models():
        return {"object": "list", "data": [model_record()]}

    @app.get("/v1/models/{model_id:path}")
    async def openai_model(model_id: str):
        server.check_model(model_id, openai=True)
        return model_record()

    def parse_common(body: dict, *, default_max: int | None):
        server.check_model(body.get("model"), openai=True)
        if _get(body, "n", int, 1) != 1 or _get(body, "best_of", int, 1) != 1:
            raise ApiError(400, "only one choice per prompt is supported (n = 1)", param="n")
        _refuse_unsupported(body, {"logprobs": "logprobs", "top_logprobs": "logprobs", "echo": "echo",
                                   "suffix": "suffixes", "tools": "tools", "functions": "tools",
                                   "response_format": "response formats"})
        temperature = _get(body, "temperature", float, 1.0)
        if temperature > 2:
            raise ApiError(400, f"'temperature' must be from 0 to 2, got {temperature}", param="temperature")
        top_p = _get(body, "top_p", float, 1.0)
        top_k = _get(body, "top_k", int)  # not OpenAI's; accepted as most compatible servers do
        sampling = _sampling(temperature, top_k, None if top_p == 1 else top_p, _get(body, "seed", int))
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        limit = _get(body, key, int, default_max)
        if limit is not None and limit < 1:
            raise ApiError(400, f"'{key}' must be at least 1, got {limit}", param=key)
        stream = _get(body, "stream", bool, False)
        options = _get(body, "stream_options", dict, {}) if stream else {}
        return sampling, limit, key, _stops(body.get("stop"), "stop"), stream, bool(options.get("include_usage"))

    def usage(done: list[Update]) -> dict:
        prompt = sum(u.prompt_tokens for u in done)
        completion = sum(u.completion_tokens for u in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def respond(request, jobs, updates, *, kind: str, stream: bool, include_usage: bool):
        chat = kind == "chat.completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        now = int(time.time())
        head = {"id": ident, "object": kind + (".chunk" if chat and stream else ""), "created": now,
                "model": served.name, "system_fingerprint": fingerprint}

        def choice(index, text, reason):
            if chat:
                return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": reason}
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

        def failed(update):
            return ApiError(500, update.error or "generation failed", kind="server_error")

        if not stream:
            texts, done = [[] for _ in jobs], [None] * len(jobs)
            async with aclosing(_updates(request, jobs, updates, watch_disconnect=True)) as each:
                async for index, update in each:
                    if update.reason == "error":
                        raise failed(update)
                    texts[index].append(update.text)
                    if update.done:
                        done[index] = update
            if None in done:
                return Response(status_code=499)  # the client is gone; nobody reads this
            return {**head, "choices": [choice(i, "".join(t), u.reason) for i, (t, u) in enumerate(zip(texts, done))],
                    "usage": usage(done)}

        def event(payload) -> str:
            return f"data: {_dumps(payload)}\n\n"

        def chunk(index, text, reason, role=False):
            extra = {"usage": None} if include_usage else {}
            if chat:
                delta = ({"role": "assistant", "content": text} if role else {"content": text}) if text or role else {}
                return event({**head, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                   "finish_reason": reason}], **extra})
            return event({**head, "choices": [{"index": index, "text": text, "logprobs": None,
                                               "finish_reason": reason}], **extra})

        async def events():
            done = []
            if chat:
                yield chunk(0, "", None, role=True)
            async with aclosing(_updates(request, jobs, updates, watch_disconnect=False)) as each:
                async for index, update in each:
                    if update.reason == "error":
                        error = failed(update)
                        yield event({"error": {"message": error.message, "type": error.kind, "param": None,
                                               "code": None}})
                        return
                    if update.text:
                        yield chunk(index, update.text, None)
                    if update.done:
                        done.append(update)
                        yield chunk(index, "", update.reason)
            if include_usage:
                yield event({**head, "choices": [], "usage": usage(done)})
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def openai_completions(request: Request):
        body = await _json_body(request)
        sampling, limit, key, stop, stream, include_usage = parse_common(body, default_max=16)
        prompts = body.get("prompt", "")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        generations = []
        for text in prompts:
            # An empty prompt starts from end-of-text, as GPT-2 samples unconditionally.
            ids = server.encode(text) or [END_OF_TEXT_ID]
            limit_here = server.max_tokens(limit, ids, param=key, prompt_param="prompt")
            generations.append(GenerationRequest(ids, limit_here, sampling, stop, None))
        jobs, updates = server.submit(request.url.path, generations)
        return await respond(request, jobs, updates, kind="text_completion", stream=stream, include_usage=include_usage)

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        body = await _json_body(request)
        sampling, limit, key, stop, stream, include_usage = parse_common(body, default_max=None)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        for message in messages:
            if isinstance(message, dict) and message.get("role") == "developer":
                message["role"] = "system"  # OpenAI's newer name for it
        ids = server.encode(_render_chat(messages, served.style)) or [END_OF_TEXT_ID]
        generation = GenerationRequest(ids, server.max_tokens(limit, ids, param=key, prompt_param="messages"),
                                       sampling, stop, served.style)
        jobs, updates = server.submit(request.url.path, [generation])
        return await respond(request, jobs, updates, kind="chat.completion", stream=stream, include_usage=include_usage)


# --- the command -----------------------------------------------------------------------------

def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be listened on."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise GptflowError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise GptflowError(f"cannot listen on {host}:{port}: {err.strerror}; pick another --port") from None


def run_server(spec: str, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, name: str | None = None,
               max_batch: int = 8, max_concurrency: int = 32, max_body_bytes: int = MAX_BODY_BYTES,
               device: str = "auto", threads: int | None = None, compile: Compile = "auto") -> None:
    """Load the model and serve it until interrupted (what `gptflow serve` runs)."""
    import torch
    import uvicorn

    from gpt_core.distributed import pick_device
    from gpt_core.tokenizer import get_tokenizer

    _check_port(host, port)
    if threads:
        torch.set_num_threads(threads)
    served = prepare_model(spec, name=name, device=pick_device(device))
    tokenizer = get_tokenizer()
    compiled = should_compile_decoding(compile, served.model.tok_emb.weight.device)
    scheduler = BatchScheduler(served.model, tokenizer, max_batch=max_batch, max_pending=max_concurrency,
                               compiled=compiled)
    app = create_app(served, tokenizer, scheduler, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    original_startup = server.startup

    async def startup(sockets=None):
        await original_startup(sockets)
        if server.started:
            shown = f"[{host}]" if ":" in host else host
            log.info("gptflow serve: %s (%s, style %s) on http://%s:%d  (Ollama API /api, OpenAI API /v1)",
                     served.name, served.digest[:12], served.style or "none: plain completion", shown, port)
    server.startup = startup
    server.run()
    if not server.started:
        raise GptflowError(f"could not listen on {host}:{port} (is the port in use?)")
