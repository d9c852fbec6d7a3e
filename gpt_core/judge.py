"""LLM-as-a-judge scoring through Ollama's HTTP API or an OpenAI-compatible one (the book's
chapter 7 evaluation).

A long scoring run must survive a flaky or slow local server: requests time out and are retried
with backoff, every scored example is appended to a cache as soon as it arrives, and an example
that cannot be scored is recorded as unscored (never dropped), so a re-run asks only for what is
missing.

A cached score is keyed by the judge's identity as the server reports it, so a score another judge
gave is never reused: for Ollama, the model's name and digest from /api/tags (the same name
pulled anew is another judge); for an OpenAI-compatible server, the model id and the base URL.
"""

import hashlib
import json
import os
import re
import time
import typing
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from gpt_core.errors import GptflowError
from gpt_core.progress import Progress
from gpt_core.prompts import format_prompt

DEFAULT_HOST = "http://localhost:11434"
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
Api = Literal["ollama", "openai"]
APIS = typing.get_args(Api)
PROMPT_VERSION = "book-ch7-v1"  # bump whenever RUBRIC changes: it keys the cache and every score
RUBRIC = (
    "Given the input `{input}` and correct output `{output}`, "
    "score the model response `{response}` on a scale from 0 to 100, where 100 is the best score. "
    "Respond with the integer number only."
)
REMINDER = "\n\nAnswer with a single integer from 0 to 100 and nothing else."


def judge_prompt(entry: Mapping, response: str) -> str:
    # Always the alpaca text without the response header, as the book does, whatever style the
    # model was trained with: scores stay comparable across prompt styles.
    prompt_input = format_prompt(entry, "alpaca", with_response_header=False)
    return RUBRIC.format(input=prompt_input, output=entry["output"], response=response)


# "85/100" and "85 out of 100" are common answers; the scale's 100 is not a second number.
_SCALE = re.compile(r"(/|\bout of)\s*100\b", re.IGNORECASE)
_INTEGER = re.compile(r"-?\d+")


def parse_score(reply: str) -> int | None:
    """The single integer 0..100 in the reply, or None when there is none or several."""
    numbers = {int(n) for n in _INTEGER.findall(_SCALE.sub("", reply))}
    if len(numbers) != 1:
        return None
    (score,) = numbers
    return score if 0 <= score <= 100 else None


@dataclass
class Judgement:
    index: int
    score: int | None  # None: unscored (the reply did not parse, or the request failed)
    reply: str
    judge_model: str
    prompt_version: str
    cached: bool = False
    error: str | None = None
    judge_identity: str | None = None  # who scored it, as the server reported (see the module doc)
    empty_response: bool = False  # scored 0 by the book's rule, without asking the judge


def _normalize_host(host: str) -> str:
    # Same leniency as Ollama's own OLLAMA_HOST: "127.0.0.1:11434" or "myhost" mean plain http,
    # and without a scheme the port defaults to Ollama's.
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = "http://" + host
        if urlsplit(host).port is None:
            host += ":11434"
    return host


def _normalize_base_url(url: str) -> str:
    # "127.0.0.1:8000/v1" means plain http; the path (usually /v1) is kept as given.
    url = url.strip().rstrip("/")
    return url if "://" in url else "http://" + url


class JudgeClient:
    """Asks a judge model for scores over Ollama's API (api="ollama", the default) or an
    OpenAI-compatible one (api="openai").

    host: the server's base URL. Ollama: default $OLLAMA_HOST or http://localhost:11434, with
    Ollama's leniency ("myhost" means http://myhost:11434). OpenAI: the URL the API's paths hang
    from, e.g. http://127.0.0.1:11435/v1; default $OPENAI_BASE_URL or https://api.openai.com/v1.
    api_key_env: the NAME of the environment variable that holds an API key, sent as a bearer
    token (the key itself never reaches a cache, a log or a manifest); None sends none.
    """

    def __init__(
        self,
        host: str | None = None,
        model: str = "llama3",
        *,
        api: Api = "ollama",
        api_key_env: str | None = None,
        seed: int = 123,
        temperature: float = 0.0,
        num_ctx: int = 2048,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_in_flight: int = 4,
    ):
        if api not in APIS:
            raise GptflowError(f"judge api must be one of {', '.join(APIS)}, got {api!r}")
        self.api = api
        if api == "ollama":
            self.host = _normalize_host(host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST)
            self.options = {"seed": seed, "temperature": temperature, "num_ctx": num_ctx}
        else:
            self.host = _normalize_base_url(host or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL)
            self.options = {"seed": seed, "temperature": temperature}
        self.model = model
        self.api_key_env = api_key_env
        self.identity: str | None = None  # set by check()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_in_flight = max_in_flight
        self._session = requests.Session()
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise GptflowError(f"the judge's API key is read from ${api_key_env}, which is not set")
            self._session.headers["Authorization"] = f"Bearer {key}"
        # One pooled connection per worker thread, so concurrent requests don't open and drop
        # extra sockets.
        adapter = HTTPAdapter(pool_maxsize=max(1, max_in_flight))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    @property
    def base_url(self) -> str:
        return self.host

    @property
    def _server(self) -> str:
        return "Ollama" if self.api == "ollama" else "The OpenAI-compatible server"

    def check(self) -> None:
        """Raise GptflowError unless the server answers and has the judge model; sets identity."""
        if self.api == "ollama":
            self._check_ollama()
        else:
            self._check_openai()

    def _listing(self, path: str, unreachable: str) -> requests.Response:
        """GET the server's model listing; `unreachable` is the error when nothing answers."""
        try:
            return self._session.get(f"{self.host}{path}", timeout=self.timeout)
        except requests.RequestException:
            raise GptflowError(unreachable) from None

    def _check_ollama(self) -> None:
        response = self._listing("/api/tags", f"Ollama is not reachable at {self.host}: start it with "
                                              "`ollama serve` (or set OLLAMA_HOST)")
        if not response.ok:
            raise GptflowError(
                f"Ollama at {self.host} answered /api/tags with HTTP {response.status_code}: "
                "check that it is an Ollama server and restart it"
            )
        try:
            models = response.json()["models"]
            listed = {m.get(key): m for m in models for key in ("name", "model")}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise GptflowError(
                f"{self.host} does not answer /api/tags like Ollama: check OLLAMA_HOST"
            ) from None
        # Ollama resolves a name without a tag to ":latest".
        wanted = self.model if ":" in self.model else f"{self.model}:latest"
        record = listed.get(wanted) or listed.get(self.model)
        if record is None:
            raise GptflowError(
                f"Ollama at {self.host} has no model '{self.model}': run `ollama pull {self.model}`"
            )
        digest = record.get("digest")
        # Without a digest only the name and the server can tell judges apart.
        self.identity = f"ollama:{wanted}@" + (f"sha256:{digest}" if digest else self.host)

    def _check_openai(self) -> None:
        response = self._listing("/models", f"the OpenAI-compatible server is not reachable at {self.host}: "
                                            "start it, or check the judge's base URL")
        if response.status_code in (401, 403):
            where = f"${self.api_key_env}" if self.api_key_env else "no key was sent: set api_key_env"
            raise GptflowError(
                f"{self.host} refused the API key with HTTP {response.status_code} ({where})"
            )
        if response.ok:
            try:
                ids = [m["id"] for m in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                raise GptflowError(
                    f"{self.host}/models does not answer like the OpenAI API: check the base URL "
                    "(it usually ends in /v1)"
                ) from None
            # Ollama and gptflow serve list NAME:latest and take NAME for it.
            listed = next((i for i in (self.model, f"{self.model}:latest") if i in ids), None)
            if listed is None:
                raise GptflowError(
                    f"{self.host} has no model '{self.model}'; it lists: {', '.join(ids[:10]) or 'none'}"
                )
        elif response.status_code == 404:  # some compatible servers do not list their models
            listed = self.model
        else:
            raise GptflowError(f"{self.host} answered /models with HTTP {response.status_code}")
        self.identity = f"openai:{listed}@{self.host}"

    def _endpoint(self) -> str:
        return f"{self.host}/api/chat" if self.api == "ollama" else f"{self.host}/chat/completions"

    def _body(self, prompt: str) -> dict:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": False}
        if self.api == "ollama":
            return {**body, "options": self.options}
        return {**body, **self.options}  # OpenAI takes seed and temperature at the top level

    def _reply(self, answer: dict) -> str:
        if self.api == "ollama":
            return answer["message"]["content"]
        return answer["choices"][0]["message"]["content"] or ""

    def chat(self, prompt: str) -> str:
        """The judge's reply to one user message; GptflowError once retries are exhausted."""
        url, body = self._endpoint(), self._body(prompt)
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._session.post(url, json=body, timeout=self.timeout)
            except requests.Timeout:
                failure = f"no answer within {self.timeout:g} s"
                continue
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
                failure = f"connection failed ({type(exc).__name__})"
                continue
            if response.status_code >= 500 or response.status_code == 429:  # busy or failing: may pass
                failure = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            if not response.ok:  # another 4xx will not change on retry
                raise GptflowError(
                    f"{self._server} at {self.host} rejected the judge "
                    f"request with HTTP {response.status_code}: {response.text[:200]}"
                )
            try:
                return self._reply(response.json())
            except (ValueError, KeyError, TypeError, IndexError):
                raise GptflowError(
                    f"{self._server} at {self.host} sent an unexpected "
                    f"answer to {url.removeprefix(self.host)}: {response.text[:200]}"
                ) from None
        raise GptflowError(
            f"judge request to {self.host} failed after {self.retries + 1} attempts: {failure}"
        )

    def _cache_key(self, prompt: str) -> str:
        identity = [self.identity, PROMPT_VERSION, self.options, prompt]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _judge(self, index: int, prompt: str) -> Judgement:
        def judgement(score, reply, error=None):
            return Judgement(index, score, reply, self.model, PROMPT_VERSION, error=error,
                             judge_identity=self.identity)

        try:
            reply = self.chat(prompt)
            if (score := parse_score(reply)) is None:
                reply = self.chat(prompt + REMINDER)
                score = parse_score(reply)
        except GptflowError as exc:
            return judgement(None, "", str(exc))
        if score is None:
            return judgement(None, reply, "the judge's reply is not a single integer from 0 to 100")
        return judgement(score, reply)

    def score_all(
        self,
        entries: Sequence[Mapping],
        responses: Sequence[str],
        cache_path: Path | None = None,
        progress: bool = True,
    ) -> list[Judgement]:
        """One Judgement per entry, in order. Scored ones are cached; unscored ones are not, so
        the next run asks for them again."""
        if len(entries) != len(responses):
            raise GptflowError(
                f"got {len(entries)} entries but {len(responses)} responses: "
                "pass one model response per test entry"
            )
        cache = _Cache(cache_path)
        results: dict[int, Judgement] = {}
        todo: dict[int, str] = {}
        if any(response.strip() for response in responses):
            # The cache is keyed by who judges, so ask the server that first. An unreachable
            # server or a missing model would also fail every request after slow retries.
            self.check()
        for index, (entry, response) in enumerate(zip(entries, responses)):
            if not response.strip():  # the book scores an empty answer 0 without asking
                results[index] = Judgement(index, 0, "", self.model, PROMPT_VERSION, empty_response=True)
                continue
            prompt = judge_prompt(entry, response)
            hit = cache.get(self._cache_key(prompt))
            if hit is not None:
                results[index] = Judgement(
                    index, hit["score"], hit["reply"], self.model, PROMPT_VERSION, cached=True,
                    judge_identity=self.identity,
                )
            else:
                todo[index] = prompt
        if todo:
            with ThreadPoolExecutor(max_workers=self.max_in_flight) as pool, \
                    Progress(len(todo), "judge", "response", enabled=progress) as bar:
                futures = [pool.submit(self._judge, i, p) for i, p in todo.items()]
                for future in as_completed(futures):
                    judgement = future.result()
                    results[judgement.index] = judgement
                    if judgement.score is not None:
                        cache.put(self._cache_key(todo[judgement.index]), judgement)
                    bar.update(1)
        return [results[i] for i in range(len(entries))]


class _Cache:
    """Append-only JSONL of scored judgements; a line torn by a crash is ignored."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, dict] = {}
        self._torn = False
        if self.path is None or not self.path.exists():
            return
        # errors="replace": a torn line may end inside a multi-byte character.
        text = self.path.read_text(encoding="utf-8", errors="replace")
        self._torn = bool(text) and not text.endswith("\n")
        for line in text.splitlines():
            try:
                record = json.loads(line)
                self.entries[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                continue

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, judgement: Judgement) -> None:
        if self.path is None:
            return
        record = {
            "key": key,
            "score": judgement.score,
            "reply": judgement.reply,
            "judge_model": judgement.judge_model,
            "judge_identity": judgement.judge_identity,
            "prompt_version": judgement.prompt_version,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            # Start on a fresh line after a torn one, or this record would be lost with it.
            out.write(("\n" if self._torn else "") + json.dumps(record) + "\n")
            out.flush()
        self._torn = False
        self.entries[key] = record


def summarize(judgements: Sequence[Judgement]) -> dict:
    """The book's mean (empty responses count as 0; failed requests are left out) and, beside it,
    the mean over what the judge actually read, so a model that answers nothing is not read as judged."""
    scores = [j.score for j in judgements if j.score is not None]
    judged = [j.score for j in judgements if j.score is not None and not j.empty_response]
    return {
        "mean_score": sum(scores) / len(scores) if scores else None,
        "mean_score_judged": sum(judged) / len(judged) if judged else None,
        "n_scored": len(scores),
        "n_empty": sum(j.empty_response for j in judgements),
        "n_unscored": len(judgements) - len(scores),
        "n_total": len(judgements),
    }
