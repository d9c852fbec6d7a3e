"""Starting real servers in tests: a free loopback port, and waiting for a health URL."""

import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 120):
    """Poll `url` until it answers 200; fails with the server's log if it exits or times out."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        assert process.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.5)
