"""Judge stage: score the instruct stage's test responses with Llama 3 served by Ollama (the book's
chapter 7 evaluation).

Ollama is checked before anything is scored. When it is unavailable (not running, or the judge
model not pulled) and judge.optional is set, the stage is skipped rather than failed: it writes no
manifest, so the next run with Ollama up does the work, and leaves a finished MLflow run tagged
gptflow.skipped with the reason, so the gap is visible where the runs are compared.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.judge import PROMPT_VERSION, Api, JudgeClient, summarize
from gpt_core.settings import Settings, setting

from . import plots
from .instruct import log_table
from .settings import stage_config
from .stage import StageSkipped
from .tracking import log_figure

log = logging.getLogger("gptflow")


@stage_config
@dataclass(frozen=True)
class Config(Settings):
    """LLM-as-judge scoring of the instruct stage's test responses, through Ollama's API or an
    OpenAI-compatible one (vLLM, llama.cpp's server, LM Studio, a hosted model, gptflow serve)."""

    api: Api = setting("ollama", doc="ollama: Ollama's /api/chat; openai: /v1/chat/completions")
    host: str | None = setting(None, doc="the server's base URL; default: $OLLAMA_HOST or http://localhost:11434 "
                                         "(ollama), $OPENAI_BASE_URL or https://api.openai.com/v1 (openai)")
    model: str = setting("llama3", doc="the judge model")
    api_key_env: str | None = setting(None, doc="name of the environment variable holding the API key, sent "
                                                "as a bearer token (the key itself never enters a config)")
    optional: bool = setting(False, doc="report the stage skipped, not failed, when the server is unreachable")
    timeout: float = setting(60.0, gt=0, doc="seconds per request")
    retries: int = setting(3, ge=0, doc="attempts after a failed request")
    max_in_flight: int = setting(4, gt=0, doc="requests at once")


def cache_path(profile) -> Path:
    # Beside the keyed run folders, not inside one: a judgement is keyed by judge model, prompt
    # version, options and the exact prompt, so it stays valid when this stage's config or the code
    # changes, and a re-run only asks for what is missing.
    return Path(profile.data_dir) / "judge" / "cache.jsonl"


def read_responses(instruct: dict) -> list[dict]:
    outputs = instruct["outputs"]
    path = Path(outputs["responses"])
    if not path.is_file() or sha256_file(path) != outputs["responses_sha256"]:
        raise GptflowError(f"{path} is missing or changed since the instruct stage wrote it; "
                           "re-run `gptflow stage instruct --force`")
    return json.loads(path.read_text(encoding="utf-8"))


def _client(config: Config) -> JudgeClient:
    return JudgeClient(config.host, config.model, api=config.api, api_key_env=config.api_key_env,
                       timeout=config.timeout, retries=config.retries, max_in_flight=config.max_in_flight)


def inputs(profile, config: Config) -> dict:
    """Who the judge is, as its server reports it (Ollama: the model's digest; OpenAI: model id and
    base URL): scores from another judge are another output. An unreachable server has no identity,
    so nothing earlier is reused for it; prepare() then fails, or skips the stage when optional."""
    client = _client(config)
    try:
        client.check()
    except GptflowError:
        return {"judge": {"key": "judge", "identity": None}}
    return {"judge": {"key": "judge", "identity": client.identity}}


def prepare(profile, config: Config, upstream) -> tuple[list[dict], JudgeClient]:
    """The responses to score and a client whose server answered and has the judge model."""
    entries = read_responses(upstream["instruct"])
    client = _client(config)
    try:
        client.check()
    except GptflowError as err:
        if not config.optional:
            raise
        raise StageSkipped(f"{err} (judge.optional is set)") from None
    return entries, client


def run(ctx) -> tuple[dict, dict]:
    folder = ctx.folder
    entries, client = ctx.prepared
    mlflow.log_params({"prompt_version": PROMPT_VERSION,
                       **{f"judge.{name}": value for name, value in client.options.items()}})
    mlflow.set_tags({"judge.model": client.model, "judge.identity": client.identity,
                     "judge.prompt_version": PROMPT_VERSION})
    judgements = client.score_all(entries, [e["model_response"] for e in entries], cache_path(ctx.profile))
    rows = [{"instruction": e["instruction"], "input": e["input"], "expected": e["output"],
             "response": e["model_response"], "score": j.score, "judge_reply": j.reply,
             "judge_model": j.judge_model, "prompt_version": j.prompt_version, "error": j.error}
            for e, j in zip(entries, judgements)]
    (folder / "judgements.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    log_table(pd.DataFrame(rows), "judgements.json")

    scores = [j.score for j in judgements if j.score is not None]
    log_figure(plots.histogram(scores, bins=20, xlabel="Score (0-100)", title=f"Judge scores ({client.model})"),
               folder, "scores.png")

    metrics = {**summarize(judgements), "n_cached": sum(j.cached for j in judgements)}
    if metrics["n_empty"]:
        log.warning("judge: %d of %d responses are empty and score 0 by the book's rule, unjudged; "
                    "mean_score_judged (%s) is over the %d the judge read", metrics["n_empty"], len(judgements),
                    metrics["mean_score_judged"], metrics["n_scored"] - metrics["n_empty"])
    if metrics["n_unscored"]:
        first = next(j for j in judgements if j.score is None)
        log.warning("judge: %d of %d responses unscored (e.g. #%d: %s); `gptflow stage judge --force` "
                    "asks again for those only", metrics["n_unscored"], len(judgements), first.index,
                    first.error)
    outputs = {"judgements": str(folder / "judgements.json"),
               "judgements_sha256": sha256_file(folder / "judgements.json"),
               "histogram": str(folder / "scores.png"), "cache": str(cache_path(ctx.profile)),
               "judge_model": client.model, "judge_identity": client.identity, "prompt_version": PROMPT_VERSION}
    return outputs, metrics
