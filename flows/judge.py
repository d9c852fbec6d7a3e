"""Judge stage: score the instruct stage's test responses with Llama 3 served by Ollama (the book's
chapter 7 evaluation).

Ollama is checked before anything is scored. When it is unavailable (not running, or the judge
model not pulled) and judge.optional is set, the stage is skipped rather than failed: run_judge
returns {"stage": "judge", "skipped": True, "reason": ...} and writes no manifest, so the next run
with Ollama up does the work. It leaves a finished MLflow run tagged gptflow.skipped with the reason,
so the gap is visible where the runs are compared.
"""

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
from prefect import flow

from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.judge import PROMPT_VERSION, JudgeClient, summarize

from . import plots
from .instruct import log_table
from .manifest import latest_manifest
from .settings import JudgeConfig, Profile
from .stage import cached_output, run_stage
from .tracking import stage_run

log = logging.getLogger("gptflow")


def cache_path(profile: Profile) -> Path:
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


def skip(profile: Profile, cfg: JudgeConfig, upstream: dict[str, dict], reason: str) -> dict:
    log.warning("judge: skipped (judge.optional is set): %s", reason)
    tags = {"gptflow.skipped": "true", "gptflow.skip_reason": reason[:5000],
            "upstream.instruct.key": upstream["instruct"]["key"]}
    if upstream["instruct"].get("mlflow_run_id"):
        tags["upstream.instruct.mlflow_run_id"] = upstream["instruct"]["mlflow_run_id"]
    with stage_run("judge", cfg.model_dump(mode="json"), profile.mlflow_config, tags=tags):
        pass
    return {"stage": "judge", "skipped": True, "reason": reason}


def run_judge(profile: Profile, instruct: dict | None = None, force: bool = False) -> dict:
    cfg: JudgeConfig = profile.judge
    upstream = {"instruct": instruct or latest_manifest(profile.data_dir, "instruct")}
    entries = read_responses(upstream["instruct"])
    # A finished output is reused without asking Ollama anything.
    previous = cached_output("judge", profile, cfg, upstream, force)
    if previous is not None:
        return previous
    client = JudgeClient(cfg.host, cfg.model, timeout=cfg.timeout, retries=cfg.retries,
                         max_in_flight=cfg.max_in_flight)
    try:
        client.check()
    except GptflowError as err:
        if not cfg.optional:
            raise
        return skip(profile, cfg, upstream, str(err))

    def body(folder, _upstream):
        mlflow.log_params({"prompt_version": PROMPT_VERSION,
                           **{f"judge.{name}": value for name, value in client.options.items()}})
        mlflow.set_tags({"judge.model": client.model, "judge.prompt_version": PROMPT_VERSION})
        judgements = client.score_all(entries, [e["model_response"] for e in entries], cache_path(profile))
        rows = [{"instruction": e["instruction"], "input": e["input"], "expected": e["output"],
                 "response": e["model_response"], "score": j.score, "judge_reply": j.reply,
                 "judge_model": j.judge_model, "prompt_version": j.prompt_version, "error": j.error}
                for e, j in zip(entries, judgements)]
        (folder / "judgements.json").write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
        log_table(pd.DataFrame(rows), "judgements.json")

        scores = [j.score for j in judgements if j.score is not None]
        fig = plots.histogram(scores, bins=20, xlabel="Score (0-100)", title=f"Judge scores ({client.model})")
        fig.savefig(folder / "scores.png", dpi=120)
        mlflow.log_figure(fig, "scores.png")
        plots.close(fig)

        metrics = {**summarize(judgements), "n_cached": sum(j.cached for j in judgements)}
        if metrics["n_unscored"]:
            first = next(j for j in judgements if j.score is None)
            log.warning("judge: %d of %d responses unscored (e.g. #%d: %s); `gptflow stage judge --force` "
                        "asks again for those only", metrics["n_unscored"], len(judgements), first.index,
                        first.error)
        outputs = {"judgements": str(folder / "judgements.json"),
                   "judgements_sha256": sha256_file(folder / "judgements.json"),
                   "histogram": str(folder / "scores.png"), "cache": str(cache_path(profile)),
                   "judge_model": client.model, "prompt_version": PROMPT_VERSION}
        return outputs, metrics

    return run_stage("judge", profile, cfg, upstream, body, force)


@flow(name="judge", log_prints=True)
def judge_flow(profile: Profile, instruct: dict | None = None, force: bool = False) -> dict:
    return run_judge(profile, instruct, force)
