"""A private MLflow store for a test: its own SQLite backend and artifact folder under `root`."""

from pathlib import Path


def private_tracking(root: Path) -> tuple[str, Path]:
    """(tracking URI, mlflow.yaml to pass to a profile), both pointing under `root`."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = root / "mlflow.yaml"
    config.write_text(f"tracking_uri: {uri}\nexperiment: test\nartifact_location: {root / 'mlruns'}\n")
    return uri, config
