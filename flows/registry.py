"""The stage registry: the one list of pipeline stages, in the order they run.

Each entry names the stage, the module that implements it and the stages whose outputs it reads,
and the metric that sums it up. The module defines `Config`, the class of the stage's profile
section, and `run(ctx)`, which does the work (see flows/stage.py); it may define `inputs(profile,
config)`, more of what the stage depends on than its upstream stages (the download stage's
checksums), which is validated before anything runs and enters the cache key.

Everything that needs the stage list reads it from here: the pipeline's graph, the profile's
sections, `gptflow stage` and `--force`, the run summary, the tests. A new stage is one module
plus one entry below.
"""

import importlib
from dataclasses import dataclass
from types import ModuleType

from gpt_core.errors import GptflowError


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    upstream: tuple[str, ...]
    headline: str
    description: str

    @property
    def implementation(self) -> ModuleType:
        return importlib.import_module(self.module)

    @property
    def config(self) -> type:
        return self.implementation.Config

    def upstream_for(self, config) -> tuple[str, ...]:
        """The upstream stages this config reads: a fine-tuning stage started from a named model
        needs no pretrain output."""
        uses = getattr(config, "uses", None)
        return tuple(name for name in self.upstream if uses is None or uses(name))


STAGES: list[Stage] = [
    Stage("download", "flows.download", (), "files", "fetch the public inputs, checksummed"),
    Stage("tokenize", "flows.tokenize", ("download",), "train_tokens",
          "corpora -> Parquet token shards; the spam and instruction splits"),
    Stage("pretrain", "flows.pretrain", ("tokenize",), "final/val_loss", "train the base model from scratch"),
    Stage("spam", "flows.spam", ("tokenize", "pretrain"), "test_accuracy", "fine-tune a spam classifier"),
    Stage("lora", "flows.lora", ("tokenize", "pretrain"), "test_accuracy", "the spam classifier through LoRA"),
    Stage("instruct", "flows.instruct", ("tokenize", "pretrain"), "val_loss_after",
          "fine-tune on instructions and answer the test split"),
    Stage("judge", "flows.judge", ("instruct",), "mean_score", "score the answers with an LLM judge"),
    Stage("export", "flows.export", ("instruct",), "formats",
          "the instruct model in Hugging Face, GGUF or Ollama form"),
]


def names() -> list[str]:
    return [stage.name for stage in STAGES]


def get(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise GptflowError(f"unknown stage '{name}'; stages: {', '.join(names())}")


def check_names(requested) -> set[str]:
    """`requested` as a set, or a one-line error naming the unknown ones."""
    unknown = sorted(set(requested) - set(names()))
    if unknown:
        raise GptflowError(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names())}")
    return set(requested)

