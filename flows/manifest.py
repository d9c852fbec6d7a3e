"""Stage manifests: what a stage produced, with hashes, config and upstream lineage.

A stage's outputs live in `<data_dir>/<stage>/<key>/`, where the key hashes everything the
outputs depend on (the stage's resolved config, the upstream manifests, the code). The folder's
manifest.json is written last, so a folder without one is an unfinished run, never a result.
"""

import functools
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from gpt_core.files import atomic_write_json

MANIFEST = "manifest.json"
LAST_USE = "last_use.json"  # when a run last asked for this output, and whether it ran or reused it
_CODE_ROOTS = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "gpt_core")


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_version() -> str:
    """Hash of the library and flow sources: changed code invalidates cached stage outputs.

    Hashed once per process: what counts is the code this process imported, and every stage key
    and manifest would otherwise re-read all sources.
    """
    digest = hashlib.sha256()
    for root in _CODE_ROOTS:
        for path in sorted(root.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_key(stage: str, config: dict, upstream: dict[str, dict]) -> str:
    inputs = {"stage": stage, "config": config, "code": code_version(),
              "upstream": {name: manifest_hash(m) for name, m in upstream.items()}}
    return sha256_json(inputs)[:16]


def manifest_hash(manifest: dict) -> str:
    """Identity of a stage output; whether this particular call reused it does not count."""
    return sha256_json({k: v for k, v in manifest.items() if k != "cached"})


def stage_dir(data_dir: Path, stage: str, key: str) -> Path:
    return Path(data_dir) / stage / key


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(folder: Path, stage: str, key: str, config: dict, upstream: dict[str, dict],
                   outputs: dict, metrics: dict | None = None, mlflow_run_id: str | None = None) -> dict:
    manifest = {
        "stage": stage,
        "key": key,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "config": config,
        "upstream": {name: {"key": m["key"], "sha256": manifest_hash(m)} for name, m in upstream.items()},
        "outputs": outputs,
        "metrics": metrics or {},
        "mlflow_run_id": mlflow_run_id,
    }
    atomic_write_json(Path(folder) / MANIFEST, manifest)
    return manifest



def record_use(folder: Path, cached: bool) -> None:
    atomic_write_json(Path(folder) / LAST_USE,
                      {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cached": cached})


def last_use(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / LAST_USE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
