"""MLflow conventions shared by every stage: one (nested) run per stage, params from the
resolved config, manifests and plots as artifacts, the tokenize stage's outputs as input
datasets, and models logged as MLflow pyfunc models, registered once per trained model under
the aliases `newest` (the latest trained) and `champion` (the best on validation)."""

import functools
import hashlib
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import LoggedModelOutput, Metric, Param
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from packaging.version import Version

from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.tokenizer import write_bpe_files
from gpt_core.weights import WEIGHTS_FILE, model_kind, read_config

from . import plots
from .home import under_home
from .locks import database_lock
from .resources import MLFLOW_CONFIG

log = logging.getLogger("gptflow")

DEFAULTS = {"tracking_uri": "sqlite:///mlflow.db", "experiment": "gptflow",
            "artifact_location": "mlruns", "model_alias": "newest", "champion_alias": "champion"}
# What each split of the tokenize stage's output is to the stage that reads it.
DATASET_CONTEXTS = {"train": "training", "val": "validation", "validation": "validation", "test": "testing"}


def load_config(path: str | Path = MLFLOW_CONFIG) -> dict:
    """The MLflow settings, with relative database and artifact paths taken from the working
    folder (flows.home); MLFLOW_TRACKING_URI, when set, overrides the tracking URI."""
    path = Path(path)
    values = dict(DEFAULTS)
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or {}
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise GptflowError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
        values.update(loaded)
    uri = os.environ.get("MLFLOW_TRACKING_URI", values["tracking_uri"])
    database = sqlite_file(uri)
    values["tracking_uri"] = f"sqlite:///{under_home(database)}" if database else uri
    location = values["artifact_location"]
    if location and "://" not in location:
        values["artifact_location"] = under_home(location).as_uri()
    return values


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite tracking URI (`sqlite:///rel.db`, `sqlite:////abs.db`)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def open_tracking(uri: str):
    """Point MLflow at `uri`; a sqlite database is opened (and, the first time, created) by one
    process at a time."""
    mlflow.set_tracking_uri(uri)
    database = sqlite_file(uri)
    if database is None:
        return
    with database_lock(database):
        client = MlflowClient()
        # Each opens (and caches) its store, whose first opening creates the schema.
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)


def configure(path: str | Path = MLFLOW_CONFIG) -> dict:
    """Point MLflow at the configured backend and experiment; returns the settings."""
    settings = load_config(path)
    open_tracking(settings["tracking_uri"])
    if mlflow.get_experiment_by_name(settings["experiment"]) is None:
        location = settings["artifact_location"]
        # None: a tracking server's own artifact store (`mlflow server --artifacts-destination`).
        mlflow.create_experiment(settings["experiment"], artifact_location=location or None)
    mlflow.set_experiment(settings["experiment"])
    return settings


def flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


class MlflowLogger:
    """gpt_core.tracking.MetricLogger into one MLflow run, addressed by id, so that processes other
    than the one that opened the run (torchrun's ranks) can log into it too.

    A stage resumed from its checkpoint continues the MLflow run it had begun and replays the
    steps after that checkpoint: points at steps the run already has are not logged again, and a
    text artifact keeps what the earlier process wrote (the replay writes the same lines, since
    resume is exact; they are not repeated).
    """

    def __init__(self, run_id: str):
        self.client, self.run_id = MlflowClient(), run_id
        self._last_step: dict[str, int] = {}  # per metric: the highest step the run had when first logged here
        self._earlier_text: dict[str, str] = {}

    def _already_logged(self, key: str, step: int) -> bool:
        if key not in self._last_step:
            history = self.client.get_metric_history(self.run_id, key)
            self._last_step[key] = max((m.step for m in history), default=-1)
        return step <= self._last_step[key]

    def log_metrics(self, metrics: Mapping[str, float], step: int):
        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items() if not self._already_logged(k, step)]
        if points:
            self.client.log_batch(self.run_id, metrics=points)

    def log_params(self, params: Mapping[str, object]):
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_text(self, text: str, name: str):
        if name not in self._earlier_text:
            self._earlier_text[name] = self._read_text(name)
        earlier = self._earlier_text[name]
        seen = set(earlier.splitlines())
        new = "".join(line for line in text.splitlines(keepends=True) if line.rstrip("\n") not in seen)
        self.client.log_text(self.run_id, earlier + new, name)

    def _read_text(self, name: str) -> str:
        """The artifact `name` as an earlier process of this run left it ("" when there is none)."""
        if not any(f.path == name for f in self.client.list_artifacts(self.run_id)):
            return ""
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(self.run_id, name, tmp)).read_text()


@functools.cache
def git_tags() -> dict[str, str]:
    """MLflow's git-commit tag for the checkout the code runs from, when it is one."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit}


def prefect_flow_run_id() -> str | None:
    """The id of the Prefect flow run this code runs in, if any."""
    if "prefect" not in sys.modules:
        return None  # never imported, so not in a flow run; importing it to find out takes a second or two
    from prefect.runtime import flow_run
    return flow_run.id


@contextmanager
def stage_run(stage: str, config: dict, mlflow_config: str | Path = MLFLOW_CONFIG, tags: dict | None = None,
              run_id_file: Path | None = None, run_name: str | None = None):
    """An MLflow run for one stage, nested under the pipeline's run when one is active.

    With `run_id_file`, a stage that crashed and is started again continues the MLflow run it
    had begun, so its metric curves continue instead of starting over in a new run.
    """
    configure(mlflow_config)
    run_tags = {"gptflow.stage": stage, **(tags or {})}
    flow_run_id = prefect_flow_run_id()
    if flow_run_id:
        run_tags["prefect.flow_run_id"] = str(flow_run_id)
    previous = _unfinished_run(run_id_file)
    nested = mlflow.active_run() is not None
    with mlflow.start_run(run_id=previous, run_name=None if previous else run_name or stage, nested=nested,
                          tags=run_tags) as run:
        if run_id_file is not None:
            run_id_file.write_text(run.info.run_id)
        if previous is None:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(config).items()})
        yield run


def _unfinished_run(run_id_file: Path | None) -> str | None:
    if run_id_file is None or not run_id_file.is_file():
        return None
    run_id = run_id_file.read_text().strip()
    try:
        status = MlflowClient().get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None
    return run_id if status != "FINISHED" else None


def run_link(run_id: str) -> str:
    """A link to the run in the MLflow UI: the tracking server's, or `mlflow ui`'s default address."""
    uri = mlflow.get_tracking_uri()
    try:
        experiment = mlflow.get_run(run_id).info.experiment_id
    except mlflow.exceptions.MlflowException:
        return f"`{run_id}`"
    if uri.startswith(("http://", "https://")):
        return f"[{run_id}]({uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id})"
    return f"[{run_id}](http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}) (with `mlflow ui` running)"


def log_figure(fig, folder: Path, name: str):
    """Save a matplotlib figure as folder/name, log it to the active run, and free it."""
    fig.savefig(folder / name, dpi=120)
    mlflow.log_figure(fig, name)
    plots.close(fig)


# The model file MLflow runs to load a gptflow model, and the library it needs beside it.
PYFUNC_MODEL = Path(__file__).resolve().parent / "pyfunc_model.py"
GPT_CORE = Path(__file__).resolve().parent.parent / "gpt_core"
# What gpt_core and the model file import; pinned to this environment's releases.
MODEL_REQUIREMENTS = ("mlflow", "torch", "tiktoken", "safetensors", "numpy", "pandas", "requests", "tqdm")
SHA_TAG = "gptflow.model_sha256"
METRIC_TAGS = ("gptflow.metric", "gptflow.metric_value", "gptflow.metric_direction")


@dataclass(frozen=True)
class ModelScore:
    """The validation metric that decides which version is `@champion`: lower is better for
    direction "min" (losses), higher for "max" (accuracies)."""
    metric: str
    value: float | None
    direction: Literal["min", "max"]

    def __post_init__(self):
        if self.direction not in ("min", "max"):
            raise GptflowError(f"a score's direction is 'min' or 'max', got {self.direction!r}")

    @property
    def known(self) -> bool:
        return self.value is not None and not math.isnan(self.value)

    def beats(self, other: "ModelScore | None") -> bool:
        """Strictly better than `other`; anything known beats an unknown or incomparable score."""
        if not self.known:
            return False
        if other is None or not other.known or (other.metric, other.direction) != (self.metric, self.direction):
            return True
        return self.value < other.value if self.direction == "min" else self.value > other.value

    def tags(self) -> dict[str, str]:
        return dict(zip(METRIC_TAGS, (self.metric, repr(float(self.value)), self.direction))) if self.known else {}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> "ModelScore | None":
        if not all(tag in tags for tag in METRIC_TAGS):
            return None
        try:
            return cls(tags[METRIC_TAGS[0]], float(tags[METRIC_TAGS[1]]), tags[METRIC_TAGS[2]])
        except (ValueError, GptflowError):
            return None


@dataclass(frozen=True)
class RegisteredVersion:
    """What log_model registered, or found already registered for the same weights."""
    name: str
    version: str
    uri: str  # models:/NAME@newest while this version is the newest, else models:/NAME/VERSION
    model_id: str | None  # the MLflow 3 LoggedModel
    new: bool  # False: these weights were registered before; no version was added, no alias moved
    champion: bool  # whether `@champion` points at this version now


def _signature(kind: str) -> ModelSignature:
    """Input, output and params schema of the pyfunc model (flows/pyfunc_model.py) by model kind."""
    if kind == "classifier":
        return ModelSignature(Schema([ColSpec("string", "text")]),
                              Schema([ColSpec("string", "label"), ColSpec("double", "probability")]))
    sampling = [ParamSpec("temperature", "double", 0.0)]
    if kind == "instruct":
        return ModelSignature(
            Schema([ColSpec("string", "instruction"), ColSpec("string", "input", required=False)]),
            Schema([ColSpec("string", "response")]),
            ParamSchema([ParamSpec("max_new_tokens", "long", 256), *sampling]))
    return ModelSignature(
        Schema([ColSpec("string", "prompt")]),
        Schema([ColSpec("string", "text"), ColSpec("string", "completion")]),
        ParamSchema([ParamSpec("max_new_tokens", "long", 50), *sampling, ParamSpec("top_k", "long", None),
                     ParamSpec("top_p", "double", None), ParamSpec("seed", "long", None)]))


def _input_example(kind: str):
    """A request the model answers; short generations, since MLflow runs it once while logging."""
    if kind == "classifier":
        return pd.DataFrame({"text": ["You won a free cruise! Text WIN to 80086", "See you at 8 then"]})
    if kind == "instruct":
        return (pd.DataFrame({"instruction": ["Rewrite the sentence using a simile."],
                              "input": ["The car is very fast."]}), {"max_new_tokens": 8})
    return pd.DataFrame({"prompt": ["Every effort moves you"]}), {"max_new_tokens": 8}


def _requirements() -> list[str]:
    return [f"{name}=={Version(metadata.version(name)).public}" for name in MODEL_REQUIREMENTS]


def _version_with_weights(client: MlflowClient, name: str, sha256: str):
    """The registered version of `name` whose weights have this sha256, if any."""
    if not client.search_registered_models(filter_string=f"name='{name}'"):
        return None
    return next((v for v in client.search_model_versions(f"name='{name}'") if v.tags.get(SHA_TAG) == sha256), None)


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def log_model(folder: Path, registered_name: str, mlflow_config: str | Path = MLFLOW_CONFIG, *,
              score: ModelScore | None = None) -> RegisteredVersion:
    """Log a model folder as an MLflow pyfunc model of the active run and register it, once.

    The model is logged "from code" (flows/pyfunc_model.py, gpt_core as its code path) with the
    folder itself as its `weights` artifact, a signature and an input example; MLflow 3 records
    it as a LoggedModel of the run. The new version is tagged with the weights' sha256 and
    `score`, `@newest` moves to it, and `@champion` too when `score` beats the champion's (the
    first version is champion). Weights already registered under this name (a re-run that
    resumed a finished checkpoint) add no version and move no alias: the run is linked to the
    model logged the first time.
    """
    settings = load_config(mlflow_config)
    newest, champion = settings["model_alias"], settings["champion_alias"]
    folder = Path(folder)
    sha256 = sha256_file(folder / WEIGHTS_FILE)
    client, run = MlflowClient(), mlflow.active_run()

    existing = _version_with_weights(client, registered_name, sha256)
    if existing is not None:
        if _model_id(existing) and run is not None:
            client.log_outputs(run.info.run_id, [LoggedModelOutput(_model_id(existing), step=0)])
        log.info("%s: these weights are version %s already; registering nothing", registered_name, existing.version)
        return _registered(client, registered_name, existing, newest, champion, new=False)

    kind = model_kind(read_config(folder))
    with tempfile.TemporaryDirectory() as tmp:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_MODEL), code_paths=[str(GPT_CORE)],
            artifacts={"weights": str(folder), "tokenizer": str(write_bpe_files(Path(tmp) / "tokenizer"))},
            signature=_signature(kind), input_example=_input_example(kind), pip_requirements=_requirements(),
            metadata={"gptflow_kind": kind, "model_sha256": sha256}, tags={SHA_TAG: sha256})
    version = mlflow.register_model(info.model_uri, registered_name,
                                    tags={SHA_TAG: sha256, **(score.tags() if score else {})})
    client.set_registered_model_alias(registered_name, newest, version.version)
    current = _alias_version(client, registered_name, champion)
    if current is None or (score is not None and score.beats(ModelScore.from_tags(current.tags))):
        client.set_registered_model_alias(registered_name, champion, version.version)
    return _registered(client, registered_name, client.get_model_version(registered_name, version.version),
                       newest, champion, new=True)


def _registered(client, name: str, version, newest: str, champion: str, new: bool) -> RegisteredVersion:
    aliases = {alias for alias in (newest, champion)
               if (pointed := _alias_version(client, name, alias)) and str(pointed.version) == str(version.version)}
    uri = f"models:/{name}@{newest}" if newest in aliases else f"models:/{name}/{version.version}"
    return RegisteredVersion(name, str(version.version), uri, _model_id(version), new, champion in aliases)


def _model_id(version) -> str | None:
    """The LoggedModel a version was registered from (a SQL registry leaves `model_id` empty
    and keeps it in the source, models:/<model id>)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def log_datasets(splits: Mapping[str, Mapping], prefix: str, path_key: str = "path", sha_key: str = "sha256"):
    """Log the tokenize stage's splits (its `outputs[prefix]`) as the active run's input datasets.

    One dataset per split, named `<prefix>-<split>`, its source the file (or, for token shards,
    their folder), its digest the file's sha256 (for shards, the sha256 of their sha256s in
    order) cut to the 36 characters MLflow stores; the full one is the input's tag
    `gptflow.sha256`. `path_key`/`sha_key` pick the file a stage reads (instruct: the JSON).
    """
    for split, part in splits.items():
        if not isinstance(part, Mapping) or not ("shards" in part or path_key in part):
            continue  # the summary's other fields (tokenizer, sources, ...)
        if "shards" in part:
            if not part["shards"]:
                continue
            sha256 = hashlib.sha256("".join(s["sha256"] for s in part["shards"]).encode()).hexdigest()
            source = Path(part["shards"][0]["path"]).parent
            tags = {"shards": str(len(part["shards"])), "tokens": str(part["tokens"])}
        else:
            sha256, source = part[sha_key], Path(part[path_key])
            tags = {"rows": str(part["rows"])} if "rows" in part else {}
        dataset = MetaDataset(LocalArtifactDatasetSource(str(source.resolve())), name=f"{prefix}-{split}",
                              digest=sha256[:36])
        mlflow.log_input(dataset, context=DATASET_CONTEXTS.get(split, split),
                         tags={"gptflow.sha256": sha256, **tags})


def resolve_model(spec: str, mlflow_config: str | Path = MLFLOW_CONFIG) -> str:
    """A local model folder (config.json + model.safetensors) for an MLflow model URI
    (models:/..., runs:/...): the downloaded MLflow model's `weights` artifact. Other specs unchanged."""
    if not spec.startswith(("models:/", "runs:/")):
        return spec
    uri = load_config(mlflow_config)["tracking_uri"]
    database = sqlite_file(uri)
    # Opening a sqlite URI creates the database: reading a model must not leave an empty one behind.
    if database is not None and not database.is_file():
        raise GptflowError(f"cannot resolve model {spec}: no MLflow database at {database} "
                           "(run the pipeline here first, or set GPTFLOW_HOME to where it ran)")
    open_tracking(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(spec))
    except mlflow.exceptions.MlflowException as err:
        raise GptflowError(f"cannot resolve model {spec}: {err.message.splitlines()[0]}"
                           + _registered_names(spec)) from None
    return str(weights_folder(local))


def _registered_names(spec: str) -> str:
    """For an unknown models:/ URI, the models that are registered (with their aliases)."""
    if not spec.startswith("models:/"):
        return ""
    models = MlflowClient().search_registered_models()
    if not models:
        return "; no model is registered yet"
    named = [m.name + "".join(f"@{a}" for a in sorted(m.aliases)) for m in sorted(models, key=lambda m: m.name)]
    return "; registered: " + ", ".join(named)


def weights_folder(model_dir: Path) -> Path:
    """The weights folder inside a downloaded MLflow model; a plain model folder (versions
    registered before models were MLflow models) is its own."""
    if not (model_dir / MLMODEL_FILE_NAME).is_file():
        return model_dir
    pyfunc = Model.load(str(model_dir)).flavors.get("python_function", {})
    weights = pyfunc.get("artifacts", {}).get("weights")
    if weights is None:
        raise GptflowError(f"{model_dir} is an MLflow model without gptflow weights")
    return model_dir / weights["path"]
