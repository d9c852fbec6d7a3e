"""Download stage: fetch every configured public input, checksummed, into <data_dir>/raw."""

import mlflow
from prefect import flow

from gpt_core.download import fetch, load_sources
from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file

from .settings import Profile
from .stage import run_stage


def run_download(profile: Profile, force: bool = False) -> dict:
    sources = load_sources(profile.sources_manifest)
    unknown = [name for name in profile.download.sources if name not in sources]
    if unknown:
        raise GptflowError(f"download.sources: unknown source(s) {', '.join(unknown)}; "
                           f"{profile.sources_manifest} lists {', '.join(sources)}")
    # The checksums are part of what the stage depends on: a changed manifest re-runs it.
    upstream = {"sources": {"key": "sources", "sources": {n: sources[n].sha256 for n in profile.download.sources}}}

    def body(folder, _upstream):
        raw = profile.data_dir / "raw"
        files, sizes = {}, {}
        for name in profile.download.sources:
            path = fetch(sources[name], raw, retries=profile.download.retries)
            files[name] = {"path": str(path.resolve()), "sha256": sha256_file(path), "url": sources[name].url,
                           "license": sources[name].license}
            sizes[f"bytes.{name}"] = path.stat().st_size
        mlflow.log_dict(files, "sources.json")
        return {"files": files}, sizes

    return run_stage("download", profile, profile.download, upstream, body, force)


@flow(name="download", log_prints=True)
def download_flow(profile: Profile, force: bool = False) -> dict:
    return run_download(profile, force)
