"""What gptflow ships beside its code: the profiles, the MLflow defaults and the source manifest.

They are package data, so an installed gptflow finds them from any directory.
"""

from importlib import resources
from pathlib import Path

from gpt_core.errors import GptflowError

_ROOT = Path(str(resources.files(__name__)))
SOURCES_MANIFEST = _ROOT / "sources.json"
MLFLOW_CONFIG = _ROOT / "mlflow.yaml"
DEFAULT_PROFILE = "default"


def profiles() -> list[str]:
    """The names of the shipped profiles, for `--config NAME`."""
    return sorted(p.stem for p in (_ROOT / "configs").glob("*.yaml"))


def profile_path(spec: str | Path | None) -> Path:
    """A profile's file: a shipped profile's name (`smoke`), or a path to a YAML file."""
    spec = str(spec or DEFAULT_PROFILE)
    if spec in profiles():
        return _ROOT / "configs" / f"{spec}.yaml"
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        raise GptflowError(f"--config {spec}: no such profile; shipped: {', '.join(profiles())}, or a YAML file")
    return path
