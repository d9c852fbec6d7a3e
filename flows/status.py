"""`gptflow status`: each stage's latest output for a profile, read from the manifests alone.

Keys are computed from the profile as a run would (flows/stage.py), so the report shows what this
profile produced, never another profile's output. It starts no Prefect server and creates no MLflow
database: the run link is written from the tracking settings and the manifest's run id.
"""

import json

from . import registry
from .manifest import last_use, read_manifest
from .settings import ProfileBase
from .stage import output_folder
from .tracking import load_config


def _run_link(run_id: str | None, tracking: dict) -> str:
    if not run_id:
        return ""
    uri = tracking["tracking_uri"]
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/runs/{run_id}"
    return f"{uri} run {run_id}"


def stage_rows(profile: ProfileBase) -> list[dict]:
    """One row per registry stage: its output under this profile, or the command that makes it."""
    tracking = load_config(profile.mlflow_config)
    rows, produced = [], {}
    for stage in registry.STAGES:
        needed = stage.upstream_for(profile.section(stage.name))
        folder = output_folder(stage.name, profile) if all(n in produced for n in needed) else None
        manifest = read_manifest(folder) if folder else None
        if manifest is None:
            rows.append({"stage": stage.name, "run": False, "command": profile.stage_command(stage.name)})
            continue
        produced[stage.name] = manifest
        outputs = manifest.get("outputs", {})
        use = last_use(folder) or {}
        rows.append({"stage": stage.name, "run": True, "key": manifest["key"], "created": manifest["created"],
                     "last_used": use.get("time", manifest["created"]), "reused": bool(use.get("cached")),
                     "headline": stage.headline, "value": manifest.get("metrics", {}).get(stage.headline),
                     "model_uri": outputs.get("model_uri"),
                     "mlflow": _run_link(manifest.get("mlflow_run_id"), tracking)})
    return rows


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render(rows: list[dict]) -> str:
    width = max(len(row["stage"]) for row in rows)
    lines = []
    for row in rows:
        if not row["run"]:
            lines.append(f"{row['stage']:<{width}}  not run — `{row['command']}`")
            continue
        when = (f"reused {row['last_used']} (ran {row['created']})" if row["reused"]
                else f"ran {row['created']}")
        parts = [row["key"], when, f"{row['headline']}={_number(row['value'])}"]
        parts += [part for part in (row["model_uri"], row["mlflow"]) if part]
        lines.append(f"{row['stage']:<{width}}  " + "  ".join(parts))
    return "\n".join(lines)


def report(profile: ProfileBase, as_json: bool) -> str:
    rows = stage_rows(profile)
    return json.dumps(rows, indent=2) if as_json else render(rows)
