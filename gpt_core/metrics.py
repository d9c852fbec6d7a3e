"""The metric vocabulary: every metric name gptflow logs, what it means and its step axis.

Recipes log the per-step series through the names below (gpt_core.train, the classifier recipe);
each stage's summary is logged once, under `summary/`, at the stage's final step; a pipeline run
logs each stage's headline as `<stage>.<headline>`. A `<...>` part of a name stands for any one
path segment (a source name, a split). tests/test_pipeline.py fails on any logged name that is
not declared here, and the README's metric table is `markdown_table()`.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    step: str  # what the MLflow step of each point counts

    def matches(self, name: str) -> bool:
        pattern = "".join("[^/]+" if part.startswith("<") else re.escape(part)
                          for part in re.split(r"(<[^>]+>)", self.name))
        return re.fullmatch(pattern, name) is not None


OPTIMIZER_STEP = "optimizer step"
FINAL_STEP = "the stage's last optimizer step (0 for stages that do not train)"

# Per-step series (gpt_core.train.Trainer and the classifier recipe log these).
TRAIN_LOSS = "train/loss"
LR = "lr"
TOKENS_PER_SEC = "tokens_per_sec"
TOKENS_SEEN = "tokens_seen"
MFU = "mfu"
COMPILE_SECONDS = "compile_seconds"
TRAIN_EVAL_LOSS = "train/eval_loss"
VAL_LOSS = "val/loss"
VAL_PERPLEXITY = "val/perplexity"
TRAIN_ACCURACY = "train/accuracy"
VAL_ACCURACY = "val/accuracy"
SUMMARY_PREFIX = "summary/"

SERIES = (
    Metric(TRAIN_LOSS, "mean loss of the step's micro-batches (all ranks)", OPTIMIZER_STEP),
    Metric(LR, "learning rate the step used", OPTIMIZER_STEP),
    Metric(TOKENS_PER_SEC, "tokens trained per second in the step (all ranks)", OPTIMIZER_STEP),
    Metric(TOKENS_SEEN, "tokens trained on so far (all ranks)", OPTIMIZER_STEP),
    Metric(MFU, "model FLOPs utilisation: the FLOPs the step really did (frozen layers and LoRA counted) "
                "over the device's measured matmul peak, per device", OPTIMIZER_STEP),
    Metric(COMPILE_SECONDS, "seconds the step spent compiling (torch.compile: the first step, recompilations); "
                            "left out of its tokens_per_sec and mfu", OPTIMIZER_STEP),
    Metric(TRAIN_EVAL_LOSS, "mean loss over the evaluation batches of the training split", OPTIMIZER_STEP),
    Metric(VAL_LOSS, "mean loss over the evaluation batches of the validation split", OPTIMIZER_STEP),
    Metric(VAL_PERPLEXITY, "exp(val/loss)", OPTIMIZER_STEP),
    Metric(TRAIN_ACCURACY, "classifiers: accuracy on the training split's evaluation batches", OPTIMIZER_STEP),
    Metric(VAL_ACCURACY, "classifiers: accuracy on the validation split's evaluation batches", OPTIMIZER_STEP),
)

# Stage summaries: the manifest's metrics, logged with SUMMARY_PREFIX.
SUMMARIES = (
    Metric("files", "download: sources fetched", FINAL_STEP),
    Metric("bytes.<source>", "download: size of one fetched source", FINAL_STEP),
    Metric("train_tokens", "tokenize: tokens in the training shards", FINAL_STEP),
    Metric("val_tokens", "tokenize: tokens in the validation shards", FINAL_STEP),
    Metric("train_shards", "tokenize: training shards written", FINAL_STEP),
    Metric("val_shards", "tokenize: validation shards written", FINAL_STEP),
    Metric("segments", "tokenize: corpus segments encoded (tasks)", FINAL_STEP),
    Metric("tokens_per_sec", "tokenize: encoding rate of the whole stage", FINAL_STEP),
    Metric("spam_<split>_rows", "tokenize: messages in a spam split", FINAL_STEP),
    Metric("instruct_<split>_rows", "tokenize: entries in an instruction split", FINAL_STEP),
    Metric("final/train_loss", "pretrain, instruct: training loss at the last evaluation", FINAL_STEP),
    Metric("final/val_loss", "pretrain: validation loss at the last evaluation", FINAL_STEP),
    Metric("final/val_perplexity", "pretrain: exp(final/val_loss)", FINAL_STEP),
    Metric("best_val_loss", "lowest validation loss of any evaluation", FINAL_STEP),
    Metric("steps", "optimizer steps trained", FINAL_STEP),
    Metric("tokens_seen", "tokens trained on", FINAL_STEP),
    Metric("parameters", "pretrain: parameters of the model", FINAL_STEP),
    Metric("params/trainable", "classifiers: parameters that trained", FINAL_STEP),
    Metric("params/total", "classifiers: parameters of the model", FINAL_STEP),
    Metric("params/trainable_share", "classifiers: params/trainable over params/total", FINAL_STEP),
    Metric("<split>_accuracy", "classifiers: accuracy on the train, val or test split, after training", FINAL_STEP),
    Metric("<split>_precision", "classifiers: precision of class spam on a split", FINAL_STEP),
    Metric("<split>_recall", "classifiers: recall of class spam on a split", FINAL_STEP),
    Metric("<split>_f1", "classifiers: F1 of class spam on a split", FINAL_STEP),
    Metric("<split>_loss", "classifiers: mean loss on a split, after training", FINAL_STEP),
    Metric("val_loss_before", "instruct: validation loss before fine-tuning", FINAL_STEP),
    Metric("val_loss_after", "instruct: validation loss after fine-tuning", FINAL_STEP),
    Metric("trainable_parameters", "instruct: parameters that trained", FINAL_STEP),
    Metric("truncated_examples", "instruct: training/validation examples cut to the allowed length", FINAL_STEP),
    Metric("n_responses", "instruct: test answers written", FINAL_STEP),
    Metric("n_empty_responses", "instruct: test answers that are empty", FINAL_STEP),
    Metric("mean_score", "judge: the book's mean score (0-100): empty answers count as 0, unscored ones are "
                         "left out", FINAL_STEP),
    Metric("mean_score_judged", "judge: mean score over the answers the judge read (not the empty ones)",
           FINAL_STEP),
    Metric("n_scored", "judge: answers with a score, the empty ones included", FINAL_STEP),
    Metric("n_empty", "judge: empty answers, scored 0 without asking the judge", FINAL_STEP),
    Metric("n_unscored", "judge: answers left unscored (failed or unparseable replies)", FINAL_STEP),
    Metric("n_total", "judge: answers to score", FINAL_STEP),
    Metric("n_cached", "judge: scores reused from the judgement cache", FINAL_STEP),
    Metric("formats", "export: formats the instruct model was written in", FINAL_STEP),
)

# On the pipeline's parent run.
HEADLINES = (
    Metric("<stage>.<headline>", "a stage's headline metric (flows.registry), so pipeline runs sort by it",
           "none (one point)"),
)


def declared(name: str) -> bool:
    """Whether an MLflow metric name is in the vocabulary."""
    if name.startswith(SUMMARY_PREFIX):
        return any(m.matches(name.removeprefix(SUMMARY_PREFIX)) for m in SUMMARIES)
    if any(m.matches(name) for m in SERIES):
        return True
    stage, dot, headline = name.partition(".")
    return bool(dot) and "/" not in stage and any(m.matches(headline) for m in SUMMARIES)


def markdown_table() -> str:
    rows = ["| metric | meaning | step |", "|---|---|---|"]
    rows += [f"| `{m.name}` | {m.meaning} | {m.step} |" for m in SERIES]
    rows += [f"| `{SUMMARY_PREFIX}{m.name}` | {m.meaning} | {m.step} |" for m in SUMMARIES]
    rows += [f"| `{m.name}` | {m.meaning} | {m.step} |" for m in HEADLINES]
    return "\n".join(rows)
