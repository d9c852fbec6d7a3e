"""The batch scheduler: waiting requests share one batch, and each gets what it would alone."""

import queue
import threading

import pytest
import torch

from gpt_core.config import get_preset
from gpt_core.errors import GptflowError
from gpt_core.generate import Sampling, generate
from gpt_core.model import GPTModel
from gpt_core.scheduler import BatchScheduler, Busy, Request
from gpt_core.tokenizer import get_tokenizer

TIMEOUT = 120  # generous: only a hang would reach it


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(get_preset("gpt-nano", context_length=128)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


class Collector:
    """Updates per job, and an event set when the job's last update arrives."""

    def __init__(self):
        self.updates = []
        self.done = threading.Event()

    def __call__(self, update):
        self.updates.append(update)
        if update.done:
            self.done.set()

    def result(self):
        assert self.done.wait(TIMEOUT)
        return "".join(u.text for u in self.updates), self.updates[-1]


def prompts(tokenizer, n):
    return [tokenizer.encode(f"prompt number {i}: " + "word " * i) for i in range(n)]


def test_waiting_requests_share_one_batch_and_get_their_own_answers(model, tokenizer):
    scheduler = BatchScheduler(model, tokenizer, max_batch=8, max_pending=8)
    ids = prompts(tokenizer, 6)
    limits = [3, 9, 1, 12, 5, 7]
    collectors = [Collector() for _ in ids]
    for prompt, limit, collect in zip(ids, limits, collectors):  # all waiting before the worker starts
        scheduler.submit(Request(prompt, limit), collect)
    scheduler.start()
    try:
        results = [c.result() for c in collectors]
    finally:
        scheduler.close()
    assert scheduler.stats["batches"] == 1 and scheduler.stats["largest_batch"] == 6
    for prompt, limit, (text, last) in zip(ids, limits, results):
        alone = generate(model, [prompt], limit)[0]
        assert last.tokens == alone and text == tokenizer.decode(alone)
        assert (last.reason, last.prompt_tokens, last.completion_tokens) == ("length", len(prompt), limit)
    assert scheduler.status()["admitted"] == 0


def test_admission_is_bounded_and_a_cancelled_request_frees_its_slot(model, tokenizer):
    scheduler = BatchScheduler(model, tokenizer, max_batch=2, max_pending=2)  # not started: all wait
    ids = prompts(tokenizer, 3)
    first = scheduler.submit(Request(ids[0], 4), Collector())
    scheduler.submit(Request(ids[1], 4), Collector())
    with pytest.raises(Busy, match="2 requests are in progress"):
        scheduler.submit(Request(ids[2], 4), Collector())
    first.cancel()
    collect = Collector()
    scheduler.submit(Request(ids[2], 4), collect)
    assert scheduler.status()["waiting"] == 2 and scheduler.stats["cancelled"] == 1
    scheduler.start()
    try:
        assert collect.result()[1].tokens == generate(model, [ids[2]], 4)[0]
    finally:
        scheduler.close()


def test_cancelling_a_running_request_stops_its_row(model, tokenizer):
    scheduler = BatchScheduler(model, tokenizer, max_batch=4, max_pending=4)
    ids = prompts(tokenizer, 2)
    long_updates = queue.Queue()
    long_job = scheduler.submit(Request(ids[0], 100), long_updates.put)
    short = Collector()
    scheduler.submit(Request(ids[1], 20), short)

    seen = []

    def cancel_after_first(update):  # runs on the worker thread, like a client going away
        seen.append(update)
        long_job.cancel()
    long_job.on_update = cancel_after_first
    scheduler.start()
    try:
        short.result()
    finally:
        scheduler.close()
    assert len(seen) == 1 and not seen[0].done  # nothing after the cancel, not even a last update
    assert scheduler.stats["cancelled"] == 1 and scheduler.stats["completed"] == 1
    # The batch ran no longer than the short request: the cancelled row did not keep it going.
    assert scheduler.stats["steps"] == 20 and scheduler.status()["admitted"] == 0


def test_stop_strings_limits_and_sampling_per_request(model, tokenizer):
    scheduler = BatchScheduler(model, tokenizer, max_batch=4, max_pending=4)
    prompt = prompts(tokenizer, 1)[0]
    free = tokenizer.decode(generate(model, [prompt], 12)[0])
    stop = free[len(free) // 2:len(free) // 2 + 3]
    jobs = {"stop": Request(prompt, 12, stop=[stop]), "zero": Request(prompt, 0),
            "seeded": Request(prompt, 12, Sampling(temperature=1.0, seed=7)),
            "seeded again": Request(prompt, 12, Sampling(temperature=1.0, seed=7))}
    collectors = {name: Collector() for name in jobs}
    for name, request in jobs.items():
        scheduler.submit(request, collectors[name])
    scheduler.start()
    try:
        results = {name: c.result() for name, c in collectors.items()}
    finally:
        scheduler.close()
    assert results["stop"][0] == free[:free.index(stop)] and results["stop"][1].reason == "stop"
    assert results["zero"][0] == "" and results["zero"][1].reason == "length"
    assert results["seeded"][0] == results["seeded again"][0]


@pytest.mark.parametrize("request_, message", [
    (Request([], 4), "at least one token"),
    (Request([1] * 128, 4), "leaves no room"),
    (Request([1] * 100, 29), "from 0 to 28"),
    (Request([60000], 4), "token ids must be"),
])
def test_requests_that_cannot_run_are_refused_up_front(model, tokenizer, request_, message):
    with pytest.raises(GptflowError, match=message):
        BatchScheduler(model, tokenizer).submit(request_, Collector())


def test_a_failed_batch_fails_its_requests_and_the_worker_goes_on(model, tokenizer, monkeypatch):
    scheduler = BatchScheduler(model, tokenizer, max_batch=1, max_pending=4)
    ids = prompts(tokenizer, 2)
    broken, fine = Collector(), Collector()
    scheduler.submit(Request(ids[0], 4, stop=["x"]), broken)
    scheduler.submit(Request(ids[1], 4), fine)
    from gpt_core import scheduler as module
    real = module.TextStream

    def text_stream(tokenizer, stop=(), style=None):
        if stop:
            raise RuntimeError("boom")
        return real(tokenizer, stop=stop, style=style)
    monkeypatch.setattr(module, "TextStream", text_stream)
    scheduler.start()
    try:
        assert broken.result()[1].reason == "error" and "boom" in broken.result()[1].error
        assert fine.result()[1].reason == "length"
    finally:
        scheduler.close()
    assert scheduler.status()["admitted"] == 0
