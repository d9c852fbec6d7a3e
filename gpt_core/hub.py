"""OpenAI's GPT-2 checkpoints from the Hugging Face Hub, through `huggingface_hub`.

The files land in the shared Hugging Face cache (`HF_HOME`, `HF_HUB_CACHE`), so transformers
and gptflow download them once between them; `HF_ENDPOINT` points at another hub and
`HF_HUB_OFFLINE=1` uses the cache without asking the network. The hub names each file by its
content hash (sha256 for weights kept in LFS, the git blob hash for small files) and the cache
stores the file under that name, so every use checks the bytes against it: a corrupt or
truncated file is removed and fetched again, never loaded.
"""

import hashlib
import logging
import sys
from pathlib import Path

from .errors import GptflowError

log = logging.getLogger("gptflow")


def fetch_repo_files(repo: str, files: tuple[str, ...]) -> Path:
    """The snapshot folder of `repo` holding `files`, each verified against its content hash."""
    from huggingface_hub.utils import disable_progress_bars

    if not sys.stderr.isatty():
        # Its bars redraw with carriage returns, which log files and the Prefect UI show as noise.
        disable_progress_bars()
    return [_fetch_verified(repo, file) for file in files][0].parent


def _fetch_verified(repo: str, file: str) -> Path:
    path = _download(repo, file, force=False)
    if _matches_blob_name(path):
        return path
    if _offline():
        _remove_blob(path)
        raise GptflowError(
            f"{repo}/{file} in the Hugging Face cache does not match its hash and was removed; "
            "unset HF_HUB_OFFLINE to fetch it again")
    log.warning("%s/%s in the Hugging Face cache does not match its hash; fetching it again", repo, file)
    _remove_blob(path)
    path = _download(repo, file, force=True)
    if not _matches_blob_name(path):
        _remove_blob(path)
        raise GptflowError(f"{repo}/{file} from {_endpoint()} does not match the hash the hub gives for it")
    return path


def _download(repo: str, file: str, force: bool) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, file, force_download=force))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else f"{_endpoint()} cannot be reached"
        raise GptflowError(
            f"{repo}/{file} is not in the Hugging Face cache and {why}: fetch it once with a "
            f"connection, or put it in GPTFLOW_MIRROR under {repo}/") from None
    except (HfHubHTTPError, OSError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GptflowError(f"cannot fetch {repo}/{file} from {_endpoint()}: {first_line}") from None


def _matches_blob_name(path: Path) -> bool:
    """Whether the cached file's bytes hash to the name the cache stores it under."""
    blob = path.resolve()
    name = blob.name
    if len(name) == 64:
        digest = hashlib.sha256()
    elif len(name) == 40:
        digest = hashlib.sha1()
        digest.update(b"blob %d\0" % blob.stat().st_size)
    else:  # not a hash the hub gave (a file placed by hand): nothing to check against
        return True
    with blob.open("rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == name


def _remove_blob(path: Path) -> None:
    blob = path.resolve()
    for doomed in (path, blob):
        try:
            doomed.unlink()
        except FileNotFoundError:
            pass


def hub_constants():
    """huggingface_hub's settings (cache folders, endpoint, offline), read from the environment at import."""
    from huggingface_hub import constants

    return constants


def _offline() -> bool:
    return hub_constants().HF_HUB_OFFLINE


def _endpoint() -> str:
    return hub_constants().ENDPOINT
