"""Typed, validated run configuration: YAML profiles plus `--set key=value` overrides.

A profile has one section per registered stage (flows.registry), typed by that stage's config
class: the training stages' classes are gpt_core's recipe settings plus the few fields only the
pipeline needs (where the base model comes from, the registered model name). pydantic validates
those dataclasses as they are, so every option is declared once; unknown keys and bad values
fail before any work starts, with the dotted key in the message.
"""

import dataclasses
import functools
import shlex
import types
import typing
from pathlib import Path

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

from gpt_core.distributed import Backend
from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.settings import Settings, SettingsError, setting, type_name

from . import resources
from .home import under_home

PRETRAIN = "pretrain"


def stage_config(cls):
    """A profile section: a frozen dataclass that pydantic validates (unknown keys are errors)."""
    return pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)


def config_dict(config) -> dict:
    """A stage config as plain JSON values (the MLflow params and the manifest's record)."""
    return TypeAdapter(type(config)).dump_python(config, mode="json")


def key_config(config) -> dict:
    """The part of the config that decides the stage's outputs: its cache key's part.

    A config class lists in RUN_ONLY the fields that change how a stage runs, never what it writes:
    they stay out of the key, so changing them neither reruns the stage nor invalidates the stages
    after it.
    """
    return {k: v for k, v in config_dict(config).items() if k not in getattr(config, "RUN_ONLY", ())}


class FineTuning:
    """Where a fine-tuning stage's base model comes from."""

    base_model: str

    def uses(self, stage: str) -> bool:
        """Whether this config reads that upstream stage's output (only `pretrain` is optional)."""
        return stage != PRETRAIN or self.base_model == PRETRAIN

    def base_model_path(self, upstream: dict[str, dict]) -> str:
        """What gpt_core.weights.load_model should load."""
        if self.base_model == PRETRAIN:
            return upstream[PRETRAIN]["outputs"]["model"]
        return str(Path(self.base_model)) if Path(self.base_model).exists() else self.base_model


def base_model_inputs(profile, config: FineTuning) -> dict:
    """A fine-tuning stage's cache-key hook: a base model given as a folder enters the key by the
    sha256 of its weights and config, so replacing them in place re-runs the stage."""
    folder = Path(config.base_model)
    if config.base_model == PRETRAIN or not folder.is_dir():
        return {}
    digests = {}
    for name in ("config.json", "model.safetensors"):
        path = folder / name
        if path.is_file():
            stat = path.stat()
            digests[name] = _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return {"base_model": {"key": "base_model", "sha256": digests}}


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, once per process for each (size, mtime) it has: planning asks for it often."""
    return sha256_file(Path(path))


BASE_MODEL_DOC = "'pretrain' (that stage's model), an OpenAI preset name such as gpt2-small, or a model folder"


@dataclasses.dataclass(frozen=True)
class DistributedConfig(Settings):
    """Data-parallel pretraining: one process per GPU (or a few CPU processes); loopback only on one node."""

    nproc_per_node: int = setting(1, gt=0, doc="training processes on each node")
    nnodes: int = setting(1, gt=0, doc="nodes; above 1 each other node starts the command the stage prints")
    rdzv_endpoint: str | None = setting(None, doc="host:port every node reaches; required when nnodes > 1")
    backend: Backend = setting("auto", doc="auto: nccl on GPUs, gloo on CPUs")
    max_restarts: int = setting(0, ge=0, doc="restarts of the whole group after a failure, each resuming from "
                                             "the last checkpoint")

    def __post_init__(self):
        super().__post_init__()
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise SettingsError("nnodes > 1 needs rdzv_endpoint (host:port of a node every node can reach)")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class ProfileBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Relative paths are taken from the working folder (flows.home), not from where the command runs.
    data_dir: Path = Field(Path("data"), validate_default=True, description="where every stage writes its outputs")
    sources_manifest: Path = Field(resources.SOURCES_MANIFEST,
                                   description="the public inputs' URLs and sha256 (default: the shipped one)")
    mlflow_config: Path = Field(resources.MLFLOW_CONFIG,
                                description="MLflow settings: tracking URI, experiment, artifact location, "
                                            "aliases (default: the shipped one)")
    # Where the values came from, for run names: the profile's name and the --set overrides.
    _source: str = PrivateAttr("custom")
    _overrides: tuple[str, ...] = PrivateAttr(())
    # As given to --config (a shipped profile's name or a file), to name commands that re-use it.
    _spec: str | None = PrivateAttr(None)

    @field_validator("data_dir", "sources_manifest", "mlflow_config", mode="after")
    @classmethod
    def _from_home(cls, path: Path) -> Path:
        return under_home(path)

    def section(self, stage: str):
        return getattr(self, stage)

    def stage_command(self, stage: str) -> str:
        """The `gptflow stage` command that runs `stage` with this profile's values."""
        parts = ["gptflow", "stage", stage] + (["--config", self._spec] if self._spec else [])
        return shlex.join(parts + [a for item in self._overrides for a in ("--set", item)])

    def describe(self, stage: str | None = None) -> str:
        """The profile's name and its overrides (of one stage's section, if given), for run names."""
        return describe_profile(self._source, self._overrides, stage)


def describe_profile(source: str, overrides, stage: str | None = None) -> str:
    prefix = f"{stage}." if stage else ""
    return " ".join([source, *(item.removeprefix(prefix) for item in overrides if item.startswith(prefix))])


@functools.cache
def _profile_model(stages: tuple) -> type[ProfileBase]:
    sections = {s.name: (s.config, Field(default_factory=s.config)) for s in stages}
    return create_model("Profile", __base__=ProfileBase, **sections)


def profile_model() -> type[ProfileBase]:
    """The Profile class: ProfileBase plus one section per registered stage."""
    from .registry import STAGES
    return _profile_model(tuple(STAGES))


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


def _hints(cls) -> dict:
    fields = getattr(cls, "model_fields", None)
    return {n: f.annotation for n, f in fields.items()} if fields is not None else typing.get_type_hints(cls)


def _options(annotation) -> tuple:
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)


def _section_class(annotation):
    return next((o for o in _options(annotation) if dataclasses.is_dataclass(o) or hasattr(o, "model_fields")), None)


def _union_field(cls, loc: tuple) -> tuple[tuple, object] | None:
    """(the key, its annotation) when a pydantic error's location runs past a union-typed key into
    the name of one of its branches ('compile', 'bool'): pydantic then reports every branch apart."""
    for depth, part in enumerate(loc):
        hints = _hints(cls) if cls is not None else {}
        if part not in hints:
            return None
        annotation = hints[part]
        if len(_options(annotation)) > 1 and depth + 1 < len(loc) and _section_class(annotation) is None:
            return loc[:depth + 1], annotation
        cls = _section_class(annotation)
    return None


def _describe(err: ValidationError, source: str) -> str:
    problems, unions = [], set()
    for e in err.errors():
        union = _union_field(profile_model(), e["loc"])
        if union is not None:
            if union[0] not in unions:
                unions.add(union[0])
                problems.append(f"{'.'.join(union[0])}: must be {type_name(union[1])}, got {e['input']!r}")
            continue
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        unknown = e["type"] in ("extra_forbidden", "unexpected_keyword_argument")
        problems.append(f"{key}: {'unknown key' if unknown else e['msg'].removeprefix('Value error, ')}")
    return f"invalid config {source}: " + "; ".join(problems)


def _numbers_given_as_booleans(values: dict, cls, where: str = "") -> str | None:
    """The first key whose annotation is a number but whose value is true/false, which pydantic
    would quietly take as 1/0 (batch_size: true trains at batch size 1)."""
    hints = _hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None:
            continue
        options = _options(hint)
        if isinstance(value, bool) and (int in options or float in options) and bool not in options:
            return f"{where}{name} must be a number, got {str(value).lower()}"
        nested = _section_class(hint)
        if isinstance(value, dict) and nested is not None:
            found = _numbers_given_as_booleans(value, nested, f"{where}{name}.")
            if found:
                return found
    return None


def load_profile(spec: str | Path | None = None, overrides: list[str] = ()) -> ProfileBase:
    """Read a profile (a shipped one's name, default `default`, or a YAML file), apply overrides, validate."""
    path = resources.profile_path(spec)
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
    problem = _numbers_given_as_booleans(values, profile_model())
    if problem:
        raise GptflowError(f"invalid config {path}: {problem}")
    try:
        profile = profile_model().model_validate(values)
    except ValidationError as err:
        raise GptflowError(_describe(err, str(path))) from None
    except GptflowError as err:
        raise GptflowError(f"invalid config {path}: {err}") from None
    profile._source, profile._overrides, profile._spec = path.stem, tuple(overrides), str(spec) if spec else None
    return profile
