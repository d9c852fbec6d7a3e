"""Download stage: fetch every configured public input, checksummed, into <data_dir>/raw."""

from dataclasses import dataclass, field
from typing import ClassVar

import mlflow

from gpt_core.download import SpeedLimits, fetch, load_sources
from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.settings import Settings, setting

from .settings import stage_config


@stage_config
@dataclass(frozen=True)
class Config(Settings):
    sources: list[str] = field(default_factory=lambda: [
        "the-verdict", "tinyshakespeare", "sms-spam", "instruction-data", "gpt2-encoder", "gpt2-vocab"],
        metadata={"doc": "names from the source manifest (sources_manifest) to fetch"})
    retries: int = setting(4, ge=0, doc="attempts after a failed download")
    deadline: float = setting(3600.0, gt=0, doc="seconds one file may take in all, retries included")
    min_rate: float = setting(1024.0, ge=0, doc="bytes per second a transfer must keep up over any 30 s; "
                                                "a slower one is cut off and retried (0: no minimum)")

    # How patient a download is never changes what it writes.
    RUN_ONLY: ClassVar[frozenset[str]] = frozenset({"retries", "deadline", "min_rate"})


def inputs(profile, config: Config) -> dict:
    """The checksums of the configured sources: a changed manifest re-runs the stage."""
    sources = load_sources(profile.sources_manifest)
    unknown = [name for name in config.sources if name not in sources]
    if unknown:
        raise GptflowError(f"download.sources: unknown source(s) {', '.join(unknown)}; "
                           f"{profile.sources_manifest} lists {', '.join(sources)}")
    return {"sources": {"key": "sources", "sources": {n: sources[n].sha256 for n in config.sources}}}


def run(ctx) -> tuple[dict, dict]:
    sources = load_sources(ctx.profile.sources_manifest)
    raw = ctx.profile.data_dir / "raw"
    files, sizes = {}, {}
    for name in ctx.config.sources:
        path = fetch(sources[name], raw, retries=ctx.config.retries,
                     speed=SpeedLimits(deadline=ctx.config.deadline, min_rate=ctx.config.min_rate))
        files[name] = {"path": str(path.resolve()), "sha256": sha256_file(path), "url": sources[name].url,
                       "license": sources[name].license}
        sizes[f"bytes.{name}"] = path.stat().st_size
    mlflow.log_dict(files, "sources.json")
    return {"files": files}, {"files": len(files), **sizes}
