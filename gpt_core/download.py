"""Fetch the pipeline's public inputs: checksummed, atomic, retried and mirror-aware.

Every file is written to a hidden temporary file beside its destination and renamed into
place only after its sha256 matches the source manifest, so a crash, a flaky network or a
changed upstream file never leaves a half-written or wrong file where later stages look.
`GPTFLOW_MIRROR` (a folder or an http(s)/file:// base URL) redirects every download to a
mirror holding the same files, which is how tests and offline machines run.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO
from urllib.parse import quote, urlsplit
from urllib.request import url2pathname

import requests
import urllib3

from gpt_core.errors import GptflowError
from gpt_core.files import atomic_output, sha256_file
from gpt_core.progress import Progress

_CHUNK = 1 << 16
_MIRROR_HINT = "check the network or set GPTFLOW_MIRROR to a mirror folder or URL"


@dataclass(frozen=True)
class Source:
    """One public input as listed in the source manifest (flows/resources/sources.json)."""

    name: str
    url: str  # canonical production URL
    mirror_path: str  # the same file's path under a mirror
    filename: str  # local file name (the extracted member's, for archives)
    sha256: str  # of the file, or of the extracted member when `member` is set
    license: str
    member: str | None = None  # for zip archives: the one member to extract


def load_sources(path: str | Path) -> dict[str, Source]:
    """Read the source manifest (`{"sources": [...]}`) into Sources keyed by name."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GptflowError(f"cannot read source manifest {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise GptflowError(f"source manifest {path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("sources"), list):
        raise GptflowError(f'source manifest {path} must be an object {{"sources": [...]}}')

    known = {f.name for f in fields(Source)}
    required = {f.name for f in fields(Source) if f.default is MISSING}
    sources: dict[str, Source] = {}
    for i, entry in enumerate(raw["sources"]):
        where = f"source manifest {path}, entry {i}"
        if not isinstance(entry, dict):
            raise GptflowError(f"{where} must be an object with keys {sorted(required)}")
        if isinstance(entry.get("name"), str):
            where += f" ({entry['name']!r})"
        if unknown := sorted(entry.keys() - known):
            raise GptflowError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(known)}")
        if missing := sorted(required - entry.keys()):
            raise GptflowError(f"{where} is missing key(s) {missing}")
        bad = sorted(k for k, v in entry.items() if not isinstance(v, str) and not (k == "member" and v is None))
        if bad:
            raise GptflowError(f"{where}: {bad} must be strings")
        source = Source(**entry)
        if len(source.sha256) != 64 or source.sha256.strip("0123456789abcdef"):
            raise GptflowError(f"{where}: sha256 must be 64 lowercase hex digits, got {source.sha256!r}")
        if source.name in sources:
            raise GptflowError(f"{where}: duplicate source name {source.name!r}")
        sources[source.name] = source
    return sources


def mirror_url(mirror: str, mirror_path: str) -> str:
    """The URL of `mirror_path` under `mirror`: an http(s)/file:// base URL or a local folder."""
    scheme = urlsplit(mirror).scheme
    if scheme in ("http", "https", "file"):
        return f"{mirror.rstrip('/')}/{quote(mirror_path)}"
    if "://" in mirror:
        raise GptflowError(f"GPTFLOW_MIRROR={mirror!r}: use a folder or an http(s):// or file:// URL")
    return (Path(mirror).expanduser().resolve() / mirror_path).as_uri()


def fetch_url(
    url: str,
    dest: Path,
    sha256: str | None,
    *,
    retries: int = 4,
    backoff: float = 0.5,
    timeout: float = 30,
    speed: SpeedLimits | None = None,
    progress: bool = True,
    label: str | None = None,
) -> Path:
    """Download `url` (http(s) or file://) to `dest`, verified against `sha256` when given.

    Returns at once if `dest` already has that sha256. Connection errors, timeouts, truncated
    bodies, HTTP 5xx and a transfer slower than `speed.min_rate` are retried `retries` times with
    exponential backoff; 4xx are not, and nothing is retried past `speed.deadline`.
    """
    speed = speed or SpeedLimits()
    give_up_at = time.monotonic() + speed.deadline
    dest = Path(dest)
    label = label or dest.name
    if _is_current(dest, sha256):
        return dest
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(url2pathname(parts.path))
        return _write_atomic(dest, sha256, label, url, lambda out: _copy_local(path, out, label, progress))
    if parts.scheme not in ("http", "https"):
        raise GptflowError(f"{label}: cannot download {url!r}; only http(s):// and file:// URLs are supported")

    def download(out: BinaryIO) -> str:
        attempts = retries + 1
        for attempt in range(1, attempts + 1):
            out.seek(0)
            out.truncate()
            try:
                return _get(url, out, label, timeout, progress, _Watchdog(speed, give_up_at))
            except (requests.ConnectionError, requests.Timeout, _Transient) as e:
                failure = e
                if time.monotonic() >= give_up_at:
                    raise GptflowError(f"could not download {label} from {url} within {speed.deadline:g} s "
                                       f"({failure}); {_MIRROR_HINT}") from None
                if attempt < attempts:
                    time.sleep(backoff * 2 ** (attempt - 1))
            except requests.RequestException as e:  # a bad URL, a redirect loop: retrying won't help
                raise GptflowError(f"could not download {label} from {url}: {e}") from e
        if isinstance(failure, _Transient):
            raise GptflowError(f"could not download {label} from {url} after {attempts} attempts: {failure}; {_MIRROR_HINT}")
        raise GptflowError(f"could not reach {parts.hostname} for {label} after {attempts} attempts: {_root_cause(failure)}; {_MIRROR_HINT}")

    return _write_atomic(dest, sha256, label, url, download)


def fetch(source: Source, dest_dir: Path, *, mirror: str | None = None, **fetch_kwargs) -> Path:
    """Fetch `source` into `dest_dir/source.filename`, from `mirror` if set, else its canonical URL.

    `mirror=None` means the GPTFLOW_MIRROR environment variable; "" means no mirror.
    `fetch_kwargs` go to `fetch_url` (retries, backoff, timeout, progress).
    """
    if mirror is None:
        mirror = os.environ.get("GPTFLOW_MIRROR", "")
    url = mirror_url(mirror, source.mirror_path) if mirror else source.url
    dest = Path(dest_dir) / source.filename
    fetch_kwargs = {"label": source.name, **fetch_kwargs}
    if source.member is None:
        return fetch_url(url, dest, source.sha256, **fetch_kwargs)

    if _is_current(dest, source.sha256):
        return dest
    # The archive lives only as long as the extraction; the zip's own hash is not pinned
    # because upstream repacks it — the member's hash is what guarantees the data.
    with tempfile.TemporaryDirectory(prefix=f"gptflow-{source.name}-") as tmp:
        archive = fetch_url(url, Path(tmp) / "archive.zip", None, **fetch_kwargs)
        return _extract_member(archive, source, url, dest)


class _Transient(Exception):
    """A failure worth retrying that requests does not raise itself (5xx, short body)."""


@dataclass(frozen=True)
class SpeedLimits:
    """How slow a download may be: done within `deadline` seconds in all (retries included), and
    at least `min_rate` bytes per second over any `window` seconds once that long has passed. A
    server trickling a byte now and then never trips requests' read timeout; these catch it."""

    deadline: float = 3600.0
    min_rate: float = 1024.0
    window: float = 30.0


class _Watchdog:
    """Watches one transfer from a thread; when it is too slow, records why and shuts its socket,
    which ends the read the downloading thread is blocked in."""

    def __init__(self, limits: SpeedLimits, give_up_at: float):
        self.limits, self.give_up_at = limits, give_up_at
        self.received, self.reason = 0, None
        self._done = threading.Event()

    def watch(self, response) -> _Watchdog:
        threading.Thread(target=self._run, args=(response,), daemon=True).start()
        return self

    def _run(self, response):
        marks = collections.deque([(time.monotonic(), 0)])
        while not self._done.wait(0.25):
            now, received = time.monotonic(), self.received
            marks.append((now, received))
            while len(marks) > 1 and marks[1][0] <= now - self.limits.window:
                marks.popleft()
            since, then = marks[0]
            if now >= self.give_up_at:
                self.reason = f"not finished within the download deadline of {self.limits.deadline:g} s"
            elif now - since >= self.limits.window and (received - then) / (now - since) < self.limits.min_rate:
                self.reason = (f"slower than {self.limits.min_rate:g} B/s over {self.limits.window:g} s "
                               f"({received - then} B)")
            if self.reason:
                _shut(response)
                return

    def stop(self):
        self._done.set()


def _shut(response):
    # http.client hands a "Connection: close" response's socket to the response's file object
    # (connection.sock is then None); shutting it down ends a recv() blocked in another thread.
    sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if sock is None:
        file = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(file, "raw", None), "_sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _chunks(response) -> Iterable[bytes]:
    """The body as it arrives (not in whole chunks), so the watchdog sees every byte."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:  # urllib3 1.x
        yield from response.iter_content(_CHUNK)
        return
    while chunk := read1(_CHUNK):
        yield chunk


def _get(url: str, out: BinaryIO, label: str, timeout: float, progress: bool, watchdog: _Watchdog) -> str:
    with requests.get(url, stream=True, timeout=timeout) as response:
        if response.status_code >= 500:
            raise _Transient(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise GptflowError(
                f"{label}: {url} returned HTTP {response.status_code} — the file is missing or access is denied; "
                "check the URL in the source manifest or the mirror's contents"
            )
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        watchdog.watch(response)
        try:
            digest = _pump(_chunks(response), out, label, total, progress, watchdog)
        except (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError) as e:
            # urllib3 reports short bodies (and a socket the watchdog shut) this way
            raise _Transient(watchdog.reason or f"connection broken mid-download ({_root_cause(e)})") from e
        except OSError as e:
            if watchdog.reason:
                raise _Transient(watchdog.reason) from e
            raise
        finally:
            watchdog.stop()
        if watchdog.reason:
            raise _Transient(watchdog.reason)
        # urllib3 1.x does not enforce Content-Length; raw.tell() counts bytes as sent (pre-decompression).
        if total is not None and response.raw.tell() < total:
            raise _Transient(f"body cut short ({response.raw.tell()} of {total} bytes)")
        return digest


def _copy_local(path: Path, out: BinaryIO, label: str, progress: bool) -> str:
    try:
        with path.open("rb") as src:
            chunks = iter(lambda: src.read(_CHUNK), b"")
            return _pump(chunks, out, label, path.stat().st_size, progress)
    except FileNotFoundError as e:
        raise GptflowError(f"{label}: {path} does not exist; check that GPTFLOW_MIRROR points at a complete mirror folder") from e
    except OSError as e:
        raise GptflowError(f"{label}: cannot read {path}: {e.strerror or e}") from e


def _extract_member(archive: Path, source: Source, url: str, dest: Path) -> Path:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise GptflowError(f"{source.name}: {url} is not a valid zip archive; check the URL or the mirror") from e
    with zf:
        # An entry escaping the target folder means a malicious or broken archive: refuse it whole.
        for name in zf.namelist():
            parts = PurePosixPath(name.replace("\\", "/"))
            if parts.is_absolute() or ".." in parts.parts or PureWindowsPath(name).drive:
                raise GptflowError(f"{source.name}: archive {url} has unsafe entry {name!r} (absolute or '..' path); refusing to extract")
        if source.member not in zf.namelist():
            raise GptflowError(f"{source.name}: archive {url} has no member {source.member!r}; check the manifest's 'member'")

        def extract(out: BinaryIO) -> str:
            with zf.open(source.member) as src:
                return _pump(iter(lambda: src.read(_CHUNK), b""), out, source.name, None, progress=False)

        try:
            return _write_atomic(dest, source.sha256, source.name, url, extract)
        except zipfile.BadZipFile as e:  # e.g. a CRC error in the member
            raise GptflowError(f"{source.name}: archive {url} is corrupt ({e}); check the URL or the mirror") from e


def _write_atomic(dest: Path, sha256: str | None, label: str, url: str, fill: Callable[[BinaryIO], str]) -> Path:
    """Have `fill` write a temp file beside `dest` (returning its sha256); verify, then rename it onto `dest`."""
    try:
        with atomic_output(dest) as tmp:
            with open(tmp, "wb") as out:
                digest = fill(out)
            if sha256 is not None and digest != sha256:
                raise GptflowError(
                    f"sha256 mismatch for {label} from {url}: expected {sha256}, got {digest}; "
                    "the file may be corrupt or changed upstream — check the URL or the mirror"
                )
    except OSError as e:  # requests' errors are OSErrors too, but fill turns those into GptflowErrors
        raise GptflowError(f"{label}: cannot write to {dest.parent}: {e.strerror or e}") from e
    return dest


def _pump(chunks: Iterable[bytes], out: BinaryIO, label: str, total: int | None, progress: bool,
          watchdog: _Watchdog | None = None) -> str:
    """Copy `chunks` to `out` with a progress bar; return their sha256."""
    digest = hashlib.sha256()
    with Progress(total, label, "B", unit_scale=True, enabled=progress) as bar:
        for chunk in chunks:
            out.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
            if watchdog is not None:
                watchdog.received += len(chunk)
    return digest.hexdigest()


def _is_current(dest: Path, sha256: str | None) -> bool:
    return sha256 is not None and dest.is_file() and sha256_file(dest) == sha256


def _root_cause(exc: BaseException) -> str:
    """The innermost error's message: "[Errno 111] Connection refused", not urllib3's wrapper chain."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return str(exc) or type(exc).__name__
