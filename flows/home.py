"""The working folder: where gptflow keeps its data, `mlflow.db` and `mlruns/`.

`GPTFLOW_HOME` when it is set, else the current directory. Relative paths in a profile and in
the MLflow settings are taken from it, so one run's state is in one place wherever it starts.
"""

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("GPTFLOW_HOME") or os.getcwd()).expanduser().resolve()


def under_home(path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else home() / path
