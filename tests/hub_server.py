"""A loopback stand-in for the Hugging Face Hub's file API, for huggingface_hub to talk to.

It serves `root/<owner>/<name>/<file>` at `/<owner>/<name>/resolve/<revision>/<file>` the way
the hub does: a HEAD answers with the commit, the file's content hash as its ETag (sha256 for
`.safetensors`, which the hub keeps in LFS, else the git blob hash) and its size; a GET sends the
bytes. `corrupt(path)` makes GETs of one file send flipped bytes under the right hash.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from servers import LoopbackHTTPServer

COMMIT = "0" * 39 + "1"


def content_hash(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer(LoopbackHTTPServer):
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.downloads: Counter[str] = Counter()  # "<owner>/<name>/<file>" -> GETs seen
        self.corrupted: set[str] = set()
        super().__init__(_handler_for(self))

    def corrupt(self, path: str) -> None:
        self.corrupted.add(path)

    def file_for(self, request_path: str) -> tuple[str, Path] | None:
        parts = unquote(urlsplit(request_path).path).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None
        name = "/".join(parts[:2] + parts[4:])
        file = (self.root / name).resolve()
        return (name, file) if file.is_file() and file.is_relative_to(self.root) else None


def _handler_for(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            found = server.file_for(self.path)
            if found is None:
                return self._head(404, 0, {"X-Error-Code": "EntryNotFound"})
            _, file = found
            etag = content_hash(file)
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
            if file.suffix == ".safetensors":
                headers["X-Linked-Etag"] = f'"{etag}"'
                headers["X-Linked-Size"] = str(file.stat().st_size)
            self._head(200, file.stat().st_size, headers)

        def do_GET(self) -> None:
            found = server.file_for(self.path)
            if found is None:
                return self._head(404, 0, {})
            name, file = found
            server.downloads[name] += 1
            data = file.read_bytes()
            if name in server.corrupted:
                data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
            self._head(200, len(data), {"X-Repo-Commit": COMMIT, "ETag": f'"{content_hash(file)}"'})
            self.wfile.write(data)

        def _head(self, status: int, length: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(length))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return Handler
