"""Flow runs whose process died: shown as Crashed at the latest when the next run starts.

A process killed outright (SIGKILL, a lost machine) cannot report its end, so its flow run would
stay Running in the Prefect UI forever. Each pipeline run notes its flow run id and process in the
data folder while it runs; the next run on that data folder finds the notes of processes that are
gone and sets their flow runs, and those runs' stage subflows still Running, to Crashed.
"""

import json
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.states import Crashed

log = logging.getLogger("gptflow")
NOTES = ".flow-runs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def mark_dead_runs_crashed(data_dir: Path) -> list[str]:
    """Crash every noted flow run of this host whose process is gone; returns their ids."""
    crashed = []
    folder = Path(data_dir) / NOTES
    with get_client(sync_client=True) as client:
        for note in sorted(folder.glob("*.json")):
            try:
                owner = json.loads(note.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if owner.get("host") != socket.gethostname() or _alive(owner["pid"]):
                continue
            message = f"the process running it (pid {owner['pid']} on {owner['host']}) ended without reporting"
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[owner["flow_run_id"]])))
            for run_id in [owner["flow_run_id"], *(str(run.id) for run in children)]:
                try:
                    if not client.read_flow_run(run_id).state.is_final():
                        client.set_flow_run_state(run_id, Crashed(message=message), force=True)
                        crashed.append(run_id)
                except Exception as err:  # a run another Prefect database holds: nothing to mark here
                    log.debug("cannot mark flow run %s crashed: %s", run_id, err)
            note.unlink(missing_ok=True)
    for run_id in crashed:
        log.warning("flow run %s was left Running by a process that died: marked Crashed", run_id)
    return crashed


@contextmanager
def noted(data_dir: Path, flow_run_id: str | None):
    """Note this process as the owner of `flow_run_id` while the block runs."""
    if flow_run_id is None:
        yield
        return
    note = Path(data_dir) / NOTES / f"{flow_run_id}.json"
    note.parent.mkdir(parents=True, exist_ok=True)
    note.write_text(json.dumps({"flow_run_id": flow_run_id, "pid": os.getpid(), "host": socket.gethostname()}))
    try:
        yield
    finally:
        note.unlink(missing_ok=True)
