"""Typed, validated run configuration: YAML profiles plus `--set key=value` overrides.

One pydantic model per stage; unknown keys and bad values fail before any work starts, with
the dotted key in the message.
"""

from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpt_core.config import ModelConfig, get_preset
from gpt_core.errors import GptflowError
from gpt_core.train import TrainSettings

DEFAULT_PROFILE = Path("configs/default.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Fields that change how a stage runs, never what it writes: they stay out of its cache key, so
    # changing them neither reruns the stage nor invalidates the stages after it.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset()

    def output_config(self) -> dict:
        """The resolved config that decides the stage's outputs: its cache key's part."""
        return self.model_dump(mode="json", exclude=set(self.RUN_ONLY))


class ModelSpec(Strict):
    """A preset from gpt_core.config.PRESETS, with some of its fields replaced."""

    preset: str = "gpt-mini"
    context_length: int | None = Field(None, gt=0)
    drop_rate: float | None = Field(None, ge=0, lt=1)
    qkv_bias: bool | None = None
    tie_weights: bool | None = None

    def build(self) -> ModelConfig:
        overrides = self.model_dump(exclude={"preset"}, exclude_none=True)
        return get_preset(self.preset, **overrides)


class DownloadConfig(Strict):
    sources: list[str] = Field(default_factory=lambda: [
        "the-verdict", "tinyshakespeare", "sms-spam", "instruction-data", "gpt2-encoder", "gpt2-vocab"])
    retries: int = Field(4, ge=0)


class TokenizeConfig(Strict):
    corpora: list[str] = Field(default_factory=lambda: ["tinyshakespeare"], min_length=1)
    shard_tokens: int = Field(1_000_000, gt=0)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    workers: int = Field(0, ge=0, description="encoding processes per task; 0 = one per CPU core")
    segment_bytes: int = Field(256 << 20, gt=0, description="bytes of corpus per tokenize task")
    task_runner: Literal["local", "dask"] = Field(
        "local", description="local: segments one after another in this process; dask: segments as Prefect "
                             "tasks on a Dask cluster")
    dask_address: str | None = Field(None, description="scheduler of a running Dask cluster (tcp://host:8786); "
                                                       "none: a temporary local cluster")
    dask_workers: int | None = Field(None, gt=0, description="workers of the temporary local cluster")
    spam_seed: int = 123
    # segment_bytes stays in the key: segments write their own shards, so it moves shard boundaries.
    RUN_ONLY = frozenset({"workers", "task_runner", "dask_address", "dask_workers"})


class TrainConfig(Strict):
    """The optimisation loop shared by every training stage (the book's appendix D)."""

    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(4e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int = Field(50, gt=0)
    eval_batches: int | None = Field(None, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU when there is one (a GPU "
                                                                       "per process under torchrun), else the CPU")
    seed: int = 123

    def train_settings(self) -> TrainSettings:
        """The training loop's settings: the fields of this config that TrainSettings has."""
        return TrainSettings(**self.model_dump(include=set(TrainSettings.__dataclass_fields__)))


class DistributedConfig(Strict):
    """Data-parallel pretraining under torchrun: one process per GPU (or a few CPU processes)."""

    nproc_per_node: int = Field(1, gt=0, description="training processes on each node")
    nnodes: int = Field(1, gt=0, description="nodes; above 1 each other node starts the command the stage prints")
    rdzv_endpoint: str | None = Field(None, description="host:port every node reaches; required when nnodes > 1")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl on GPUs, gloo on CPUs")
    max_restarts: int = Field(0, ge=0, description="restarts of the whole group after a failure, each "
                                                   "resuming from the last checkpoint")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @model_validator(mode="after")
    def _check_rendezvous(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of a node every node can reach)")
        return self


class PretrainConfig(TrainConfig):
    model: ModelSpec = Field(default_factory=ModelSpec)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    init: Literal["gpt2", "pytorch"] = Field("gpt2", description="weight initialisation; the book's is 'pytorch'")
    stride: int | None = Field(None, gt=0, description="sliding-window stride; default: the context length")
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = Field(25, ge=0)
    registered_name: str = "gptflow-base"


class LoraSettings(Strict):
    rank: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    targets: Literal["all", "attention"] = "all"
    embedding_rank: int | None = Field(None, gt=0, description="also adapt the token embedding, at this rank "
                                                               "(not in the book; for a base model that never "
                                                               "saw the task's vocabulary)")


class SpamConfig(TrainConfig):
    """Classification fine-tuning (the book's chapter 6)."""

    base_model: str = Field("pretrain", description="'pretrain' (that stage's model), an OpenAI preset "
                                                    "name such as gpt2-small, or a model folder")
    trainable: Literal["last_block", "all", "head"] = "last_block"
    max_length: int | None = Field(None, gt=0, description="pad/truncate length; default: longest training text")
    drop_rate: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(5, gt=0)
    lr: float = Field(5e-5, gt=0)
    registered_name: str = "gptflow-spam"


class LoraConfig(SpamConfig):
    """The spam task with LoRA adapters (the book's appendix E)."""

    lora: LoraSettings = Field(default_factory=LoraSettings)
    lr: float = Field(8e-4, gt=0)
    registered_name: str = "gptflow-spam-lora"


class InstructConfig(TrainConfig):
    """Instruction fine-tuning (the book's chapter 7)."""

    base_model: str = "pretrain"
    style: Literal["alpaca", "phi3"] = "alpaca"
    mask_prompt: bool = False
    allowed_max_length: int | None = Field(1024, gt=0, description="truncate examples; capped at the model context")
    overflow: Literal["truncate", "error"] = "truncate"
    lora: LoraSettings | None = Field(None, description="fine-tune LoRA adapters instead of all weights")
    drop_rate: float = Field(0.0, ge=0, lt=1)
    epochs: int = Field(2, gt=0)
    lr: float = Field(5e-5, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    generation_batch_size: int = Field(8, gt=0)
    registered_name: str = "gptflow-instruct"


class JudgeConfig(Strict):
    """LLM-as-judge scoring of the instruct stage's test responses through Ollama."""

    host: str | None = Field(None, description="default: $OLLAMA_HOST or http://localhost:11434")
    model: str = "llama3"
    optional: bool = Field(False, description="report the stage skipped, not failed, when Ollama is unreachable")
    timeout: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    max_in_flight: int = Field(4, gt=0)


class Profile(Strict):
    data_dir: Path = Path("data")
    sources_manifest: Path = Path("data/sources.json")
    mlflow_config: Path = Path("mlflow.yaml")
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    spam: SpamConfig = Field(default_factory=SpamConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    instruct: InstructConfig = Field(default_factory=InstructConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)

    @model_validator(mode="after")
    def _check_model(self):
        self.pretrain.model.build()
        return self


def _parse_override(item: str) -> tuple[list[str], object]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise GptflowError(f"--set expects key=value, got '{item}'")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def _apply_override(values: dict, path: list[str], value):
    node = values
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise GptflowError(f"--set {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def _describe(err: ValidationError, source: str) -> str:
    problems = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        problems.append(f"{key}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return f"invalid config {source}: " + "; ".join(problems)


def load_profile(path: str | Path | None = None, overrides: list[str] = ()) -> Profile:
    """Read a YAML profile (default configs/default.yaml), apply overrides, validate."""
    path = Path(path) if path else DEFAULT_PROFILE
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise GptflowError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise GptflowError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise GptflowError(f"config {path} must be a mapping of sections")
    for item in overrides:
        _apply_override(values, *_parse_override(item))
    try:
        return Profile.model_validate(values)
    except ValidationError as err:
        raise GptflowError(_describe(err, str(path))) from None
    except GptflowError as err:
        raise GptflowError(f"invalid config {path}: {err}") from None
