"""Start a one-node training group without opening a port to the network.

torchrun's rendezvous store listens on every interface even for `--standalone`, and gloo binds
to whatever the host name resolves to. A single node needs neither: the ranks meet through a
file (torch's FileStore) and their gloo/NCCL sockets are pinned to the loopback interface, so
nothing of a local run is reachable from another machine. Multi-node runs still go through
torchrun, where listening on the network is the point.

`run_group` starts the ranks, stops the others as soon as one fails, and starts the whole group
again up to `max_restarts` times (each start resumes from the last checkpoint).
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

STORE_ENV = "GPTFLOW_GROUP_STORE"
USER_ERROR = 2  # a rank that exits with this failed on its input; starting again would fail the same way
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 30


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), "lo")


def rank_environment(base: dict, rank: int, world_size: int, store_file: Path) -> dict:
    interface = loopback_interface()
    return {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", STORE_ENV: str(store_file),
            "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface}


def _stop(processes: list[subprocess.Popen]):
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _run_once(command: list[str], world_size: int, env: dict, store_file: Path) -> int:
    """Start every rank, wait for all of them; the first failure stops the rest and is returned."""
    store_file.unlink(missing_ok=True)
    processes = [subprocess.Popen(command, env=rank_environment(env, rank, world_size, store_file))
                 for rank in range(world_size)]
    try:
        while True:
            codes = [process.poll() for process in processes]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                return failed[0]
            if all(code == 0 for code in codes):
                return 0
            time.sleep(POLL_SECONDS)
    finally:
        _stop(processes)
        store_file.unlink(missing_ok=True)


def run_group(command: list[str], world_size: int, folder: Path, max_restarts: int = 0,
              env: dict | None = None) -> int:
    """Run `command` as ranks 0..world_size-1 on this machine; 0 when every rank succeeded."""
    env = dict(os.environ if env is None else env)
    store_file = Path(folder) / "group-store"
    for attempt in range(max_restarts + 1):
        returncode = _run_once(command, world_size, env, store_file)
        if returncode in (0, USER_ERROR):
            return returncode
        if attempt < max_restarts:
            print(f"training group failed (exit {returncode}); starting it again from the last checkpoint "
                  f"({attempt + 1} of {max_restarts} restarts)", flush=True)
    return returncode
