"""Batched generation for concurrent requests: one worker thread owns the model.

Design (static batching, the simplest that truly batches): requests wait in one FIFO queue.
Whenever the worker is free it takes up to `max_batch` of them and decodes them together as one
TokenStream (left-padded prompts, one KV cache, one forward pass per step for all rows) until
every row has finished; requests that arrive meanwhile wait for the next batch. Each row keeps
its own token limit, sampling settings and stop strings, and finishes at end-of-text, at a stop
string, at its limit, or when its client goes away (`Job.cancel()`), whichever comes first.

Only the worker thread touches the model, so nothing needs a lock around PyTorch. At most
`max_pending` requests are admitted at once (running or waiting); `submit` refuses more with
`Busy` rather than queueing without bound. A cancelled request gives its admission slot back at
once (and its batch row at the next step).

Continuous batching (letting a new request join a running batch) would cut waiting under steady
load, but needs per-row cache offsets; a batch here lasts at most one context's worth of steps.
"""

import itertools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import tiktoken

from .errors import GptflowError
from .generate import Sampling, TokenStream
from .model import GPTModel
from .streaming import TextStream
from .tokenizer import END_OF_TEXT_ID

log = logging.getLogger("gptflow")


class Busy(GptflowError):
    """Too many requests are admitted already; try again later."""


@dataclass(frozen=True)
class Request:
    prompt: Sequence[int]  # token ids, at least one
    max_tokens: int  # new tokens at most; prompt + max_tokens must fit the context
    sampling: Sampling = Sampling()
    stop: Sequence[str] = ()
    style: str | None = None  # an instruction model's prompt style: its answer is cleaned


@dataclass
class Update:
    """What the worker hands a job's `on_update`: a piece of text, and finally done=True."""
    text: str = ""
    done: bool = False
    reason: str | None = None  # when done: "stop" (end-of-text or a stop string), "length", "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens: list[int] | None = None  # when done: every new token id, stop token excluded
    timings: dict[str, int] = field(default_factory=dict)  # when done: nanoseconds, see Job


class Job:
    """One admitted request. `on_update` is called from the worker thread: keep it quick."""

    _ids = itertools.count(1)

    def __init__(self, request: Request, on_update: Callable[[Update], None]):
        self.id = next(self._ids)
        self.request = request
        self.on_update = on_update
        self.cancelled = False
        self.finished = False  # done was delivered, or the job was dropped after cancel()
        self.tokens: list[int] = []
        self.submitted_ns = time.monotonic_ns()
        self.started_ns = self.first_token_ns = 0
        self._scheduler: "BatchScheduler | None" = None

    def cancel(self) -> None:
        """The client went away: stop generating for it and give its slot back."""
        if not self.cancelled and self._scheduler is not None:
            self._scheduler._cancel(self)


class BatchScheduler:
    def __init__(self, model: GPTModel, tokenizer: tiktoken.Encoding, *, max_batch: int = 8,
                 max_pending: int = 32, compiled: bool = False):
        if max_batch < 1 or max_pending < 1:
            raise GptflowError(f"max_batch and max_pending must be at least 1, got {max_batch} and {max_pending}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.compiled = compiled
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._admitted = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="gptflow-decode", daemon=True)
        # batches run, the most rows one had, requests completed / cancelled by their client /
        # failed, tokens of completed requests, and decode steps (one forward pass each).
        self.stats = {"batches": 0, "largest_batch": 0, "completed": 0, "cancelled": 0, "failed": 0,
                      "tokens": 0, "steps": 0}

    # -- the callers' side (any thread) ---------------------------------------------------
    def start(self) -> "BatchScheduler":
        self._thread.start()
        return self

    def close(self, timeout: float | None = 30) -> None:
        """Finish the running batch, fail the waiting jobs, stop the worker."""
        with self._cond:
            self._closing = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            self._release(job)
            self._deliver(job, Update(done=True, reason="error", error="the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self, request: Request) -> None:
        """Raise GptflowError unless `request` can run (what submit() checks first)."""
        context = self.model.cfg.context_length
        if not request.prompt:
            raise GptflowError("the prompt needs at least one token")
        if len(request.prompt) >= context:
            raise GptflowError(f"the prompt is {len(request.prompt)} tokens; the model's context is "
                               f"{context}, which leaves no room for an answer")
        if not 0 <= request.max_tokens <= context - len(request.prompt):
            raise GptflowError(f"max tokens must be from 0 to {context - len(request.prompt)} (the "
                               f"context of {context} less the prompt's {len(request.prompt)} tokens), "
                               f"got {request.max_tokens}")
        if any(not 0 <= t < self.model.cfg.vocab_size for t in request.prompt):
            raise GptflowError(f"prompt token ids must be from 0 to {self.model.cfg.vocab_size - 1}")

    def submit(self, request: Request, on_update: Callable[[Update], None]) -> Job:
        """Admit `request`; GptflowError if it cannot run, Busy if max_pending are admitted."""
        self.check(request)
        job = Job(request, on_update)
        with self._cond:
            if self._closing:
                raise Busy("the server is shutting down")
            if self._admitted >= self.max_pending:
                raise Busy(f"{self._admitted} requests are in progress already, the most this server "
                           "takes at once; try again shortly")
            self._admitted += 1
            job._scheduler = self
            self._queue.append(job)
            self._cond.notify()
        return job

    def status(self) -> dict:
        with self._cond:
            return {"running": sum(not j.finished for j in self._running), "waiting": len(self._queue),
                    "admitted": self._admitted, "max_batch": self.max_batch,
                    "max_pending": self.max_pending, **self.stats}

    def _cancel(self, job: Job) -> None:
        with self._cond:
            if job.cancelled or job.finished:
                return
            job.cancelled = True
            queued = job in self._queue
            if queued:
                self._queue.remove(job)
            self.stats["cancelled"] += 1
        # A running job's row is stopped by the worker at its next step.
        self._release(job)

    def _release(self, job: Job) -> None:
        with self._cond:
            if job.finished:
                return
            job.finished = True
            self._admitted -= 1

    def _deliver(self, job: Job, update: Update) -> None:
        if job.cancelled:
            return
        try:
            job.on_update(update)
        except Exception:  # a broken consumer must not take the batch down
            log.warning("serve: dropping an update for job %d:\n%s", job.id, traceback.format_exc())

    # -- the worker thread --------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                self._running = batch
                self.stats["batches"] += 1
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            try:
                self._decode(batch)
            except Exception as exc:
                log.error("serve: a batch of %d failed:\n%s", len(batch), traceback.format_exc())
                for job in batch:
                    if not job.finished:
                        self.stats["failed"] += 1
                        self._release(job)
                        self._deliver(job, Update(done=True, reason="error", error=f"generation failed: {exc}",
                                                  prompt_tokens=len(job.request.prompt)))
            finally:
                with self._cond:
                    self._running = []

    def _finish(self, job: Job, text: TextStream, reason: str, piece: str = "") -> None:
        now = time.monotonic_ns()
        first = job.first_token_ns or now
        self.stats["completed"] += 1
        self.stats["tokens"] += len(job.tokens)
        self._release(job)  # first: a consumer woken by the last update may cancel() at once
        self._deliver(job, Update(
            text=piece + text.finish(), done=True, reason=reason, prompt_tokens=len(job.request.prompt),
            completion_tokens=len(job.tokens), tokens=list(job.tokens),
            timings={"total": now - job.submitted_ns, "queued": job.started_ns - job.submitted_ns,
                     "prompt": first - job.started_ns, "eval": now - first}))

    def _decode(self, batch: list[Job]) -> None:
        requests = [job.request for job in batch]
        texts = [TextStream(self.tokenizer, stop=r.stop, style=r.style) for r in requests]
        started = time.monotonic_ns()
        for job in batch:
            job.started_ns = started
        stream = TokenStream(self.model, [r.prompt for r in requests], [r.max_tokens for r in requests],
                             sampling=[r.sampling for r in requests], stop_id=END_OF_TEXT_ID,
                             compiled=self.compiled)
        try:
            for step in stream:
                now = time.monotonic_ns()
                self.stats["steps"] += 1
                for row, (job, token, text) in enumerate(zip(batch, step, texts)):
                    if job.cancelled:  # (its slot is given back already)
                        stream.stop(row)
                        continue
                    if job.finished:
                        continue
                    if token is None:  # end-of-text, or a limit of 0
                        self._finish(job, text, "length" if job.request.max_tokens == 0 else "stop")
                        continue
                    job.first_token_ns = job.first_token_ns or now
                    job.tokens.append(token)
                    piece = text.feed(token)
                    if text.stopped:
                        stream.stop(row)
                        self._finish(job, text, "stop", piece)
                    elif len(job.tokens) >= job.request.max_tokens:
                        self._finish(job, text, "length", piece)
                    elif piece:
                        self._deliver(job, Update(text=piece))
        finally:
            stream.close()
        for job, text in zip(batch, texts):  # rows whose limit was 0 when no step ran at all
            if not job.finished:
                self._finish(job, text, "length")
