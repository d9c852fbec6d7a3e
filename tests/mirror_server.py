"""A loopback HTTP mirror for tests: serves a folder and misbehaves on request.

Tests start it, point downloads at `server.url`, and script failures per path (server
errors, truncated bodies, 404s, wrong bytes) to exercise the downloader's retry and
integrity rules without a network.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import unquote, urlsplit

from servers import LoopbackHTTPServer


@dataclass
class _Rule:
    status: int | None = None  # answer with this status and no body
    truncate: bool = False  # announce the full length, send half, hang up
    body: bytes | None = None  # serve these bytes instead of the file
    times: int | None = None  # misbehave for this many requests, then serve normally; None = always
    trickle: float | None = None  # announce the full length, then send one byte every this many seconds


class MirrorServer(LoopbackHTTPServer):
    """Serves `root` on 127.0.0.1 at a free port; use as a context manager."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.requests: Counter[str] = Counter()  # path (e.g. "the-verdict.txt") -> requests seen
        self._rules: dict[str, _Rule] = {}
        self._lock = threading.Lock()
        super().__init__(_handler_for(self))

    def fail(self, path: str, status: int = 500, times: int | None = None) -> None:
        self._rules[path] = _Rule(status=status, times=times)

    def truncate(self, path: str, times: int | None = None) -> None:
        self._rules[path] = _Rule(truncate=True, times=times)

    def trickle(self, path: str, every: float, times: int | None = None) -> None:
        self._rules[path] = _Rule(trickle=every, times=times)

    def serve_bytes(self, path: str, data: bytes) -> None:
        self._rules[path] = _Rule(body=data)

    def _take_rule(self, path: str) -> _Rule | None:
        """Count the request and return the rule that applies to it, using up one of its times."""
        with self._lock:
            self.requests[path] += 1
            rule = self._rules.get(path)
            if rule is None or rule.times is None:
                return rule
            if rule.times == 0:
                return None
            rule.times -= 1
            return rule


def _handler_for(server: MirrorServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = unquote(urlsplit(self.path).path).lstrip("/")
            rule = server._take_rule(path)
            if rule and rule.status:
                return self._send(rule.status, b"")
            if rule and rule.body is not None:
                return self._send(200, rule.body)
            file = (server.root / path).resolve()
            if not file.is_file() or not file.is_relative_to(server.root):
                return self._send(404, b"")
            data = file.read_bytes()
            if rule and rule.trickle:
                return self._trickle(data, rule.trickle)
            if rule and rule.truncate:
                self.close_connection = True
                return self._send(200, data[: len(data) // 2], length=len(data))
            self._send(200, data)

        def _send(self, status: int, data: bytes, length: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            self.wfile.write(data)

        def _trickle(self, data: bytes, every: float) -> None:
            self.close_connection = True
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                for byte in data:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(every)
            except OSError:  # the client gave up: what the test wants
                pass

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

    return Handler
