"""Data-parallel training with gloo on this CPU, under torchrun and under our one-node launcher: same losses as one process with the
same effective batch, exact resume of the whole group after SIGKILL, and through the pretrain stage
one MLflow run and one checkpoint series."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from flows.download import Config as DownloadConfig
from flows.pretrain import Config as PretrainConfig
from flows.settings import DistributedConfig, profile_model
from flows.stage import run_stage
from flows.tokenize import Config as TokenizeConfig
from gpt_core.batches import DatasetBatches, RankShare
from gpt_core.checkpoint import CheckpointStore
from gpt_core.config import ModelSpec, get_preset
from gpt_core.errors import GptflowError
from gpt_core.launcher import run_group
from gpt_core.model import GPTModel
from gpt_core.train import train
from tests.tracking import private_tracking

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import train_job  # noqa: E402

# With faulthandler on, a rank that aborts prints its Python stack, not just the launcher's report.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)]), "OMP_NUM_THREADS": "1",
       "PYTHONFAULTHANDLER": "1"}

Profile = profile_model()

def job(nproc: int, shard_dir, checkpoints, out, delay=0.0, batch_size=4) -> subprocess.Popen:
    args = [str(HERE / "train_job.py"), str(shard_dir), str(checkpoints), str(out), str(delay), str(batch_size)]
    if nproc > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    return subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process: subprocess.Popen):
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output


def descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def weights(folder) -> dict:
    return load_file(Path(folder) / "model.safetensors")


def history(checkpoints) -> list[dict]:
    return json.loads((CheckpointStore(checkpoints).latest() / "state.json").read_text())["history"]


def test_rank_share_splits_an_epoch_between_ranks_in_the_sources_order():
    source = DatasetBatches(list(range(10)), 1, lambda items: items, shuffle=True, drop_last=False, seed=5)
    whole = list(source.batches(3))
    shares = [RankShare(source, rank, 3) for rank in range(3)]
    assert [s.num_batches(3) for s in shares] == [3, 3, 3]  # even: the 10th batch is left out
    per_rank = [list(s.batches(3)) for s in shares]
    assert [per_rank[i % 3][i // 3] for i in range(9)] == whole[:9]
    assert list(shares[1].batches(3, skip=2)) == per_rank[1][2:]
    uneven = [list(RankShare(source, rank, 3, even=False).batches(3)) for rank in range(3)]
    assert sorted(b for batches in uneven for b in batches) == sorted(whole)


def test_two_gloo_processes_match_one_process_with_the_same_effective_batch(shard_dir, tmp_path):
    single = job(1, shard_dir, tmp_path / "single", tmp_path / "single-model", batch_size=8)
    finish(single)
    group = job(2, shard_dir, tmp_path / "group", tmp_path / "group-model", batch_size=4)
    finish(group)

    for a, b in zip(history(tmp_path / "single"), history(tmp_path / "group"), strict=True):
        assert a["step"] == b["step"] and a["tokens_seen"] == b["tokens_seen"]
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)
    one, two = weights(tmp_path / "single-model"), weights(tmp_path / "group-model")
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-4, rtol=1e-3)
    # Rank 1 wrote nothing of its own: one series of step folders and the best model.
    assert sorted(p.name for p in (tmp_path / "group").iterdir()) == ["LATEST", "best", "step-0000011",
                                                                      "step-0000012"]

    # The group's checkpoint records its size, and one process may not continue it.
    train_data, val_data = train_job.data(shard_dir)
    with pytest.raises(GptflowError, match="written by 2 process"):
        train(GPTModel(get_preset("gpt-nano", context_length=32)), train_job.SETTINGS, train_data, val_data,
              tmp_path / "group", progress=False)


def test_killed_group_resumes_to_the_uninterrupted_groups_weights(shard_dir, tmp_path):
    finish(job(2, shard_dir, tmp_path / "straight", tmp_path / "straight-model"))

    killed = job(2, shard_dir, tmp_path / "killed", tmp_path / "killed-model", delay=0.3)
    store = CheckpointStore(tmp_path / "killed")
    deadline = time.time() + 120
    while (store.latest() is None or store.latest().name < "step-0000005") and time.time() < deadline:
        time.sleep(0.05)
    for pid in [killed.pid, *descendants(killed.pid)]:  # the agent and both ranks, as on a lost node
        os.kill(pid, signal.SIGKILL)
    killed.communicate()
    assert store.latest().name < "step-0000012" and not (tmp_path / "killed-model").exists()

    finish(job(2, shard_dir, tmp_path / "killed", tmp_path / "killed-model"))
    straight, resumed = weights(tmp_path / "straight-model"), weights(tmp_path / "killed-model")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [h["step"] for h in history(tmp_path / "killed")] == [0, 4, 8, 12]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, mirror):
    tmp = tmp_path_factory.mktemp("distributed")
    db, tracking = private_tracking(tmp)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
        profile = Profile(data_dir=tmp / "data", mlflow_config=tracking,
                          download=DownloadConfig(sources=["the-verdict", "gpt2-encoder", "gpt2-vocab"]),
                          tokenize=TokenizeConfig(corpora=["the-verdict"], shard_tokens=2000, workers=1))
        yield profile, run_stage("tokenize", profile, {"download": run_stage("download", profile)}), db


def pretrain_profile(profile: Profile, **changes) -> Profile:
    pretrain = PretrainConfig(model=ModelSpec(preset="gpt-nano", context_length=64), max_steps=6, eval_every=3,
                              checkpoint_every=3, lr=1e-3, sample_tokens=4, precision="fp32", **changes)
    return profile.model_copy(update={"pretrain": pretrain})


def test_pretrain_stage_runs_torchrun_into_one_mlflow_run_and_one_checkpoint_series(tokenized, monkeypatch):
    profile, tokenize, db = tokenized
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    single = run_stage("pretrain", pretrain_profile(profile, batch_size=4), {"tokenize": tokenize})
    group = run_stage("pretrain", pretrain_profile(profile, batch_size=2, distributed=DistributedConfig(nproc_per_node=2)), {"tokenize": tokenize})

    assert group["outputs"]["world_size"] == 2 and single["outputs"]["world_size"] == 1
    assert group["metrics"]["steps"] == single["metrics"]["steps"] == 6
    assert group["metrics"]["tokens_seen"] == single["metrics"]["tokens_seen"]
    for name in ("final/train_loss", "final/val_loss"):
        # Batches of 2 and of 4 sum in other orders: float32 rounding, not a different computation.
        assert group["metrics"][name] == pytest.approx(single["metrics"][name], rel=1e-4)

    client = MlflowClient(db)
    experiment = client.get_experiment_by_name("test")
    runs = client.search_runs([experiment.experiment_id], "tags.`gptflow.stage` = 'pretrain'")
    assert sorted(r.info.run_id for r in runs) == sorted([single["mlflow_run_id"], group["mlflow_run_id"]])
    run = client.get_run(group["mlflow_run_id"])
    assert run.data.params["train.world_size"] == "2"
    assert run.data.params["train.effective_batch_size"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 7))
    assert "samples.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    checkpoints = Path(group["outputs"]["best_model"]).parent
    assert sorted(p.name for p in checkpoints.iterdir()) == ["LATEST", "best", "step-0000003", "step-0000006"]


def test_a_rank_error_reaches_the_stage_as_its_message(tokenized, monkeypatch):
    profile, tokenize, db = tokenized
    monkeypatch.setenv("MLFLOW_TRACKING_URI", db)
    # 71 windows of 64 tokens make 2 batches of 32: one per rank, fewer than grad_accum=2.
    broken = pretrain_profile(profile, batch_size=32, grad_accum=2, distributed=DistributedConfig(nproc_per_node=2))
    with pytest.raises(GptflowError, match="batches per epoch per process, fewer than grad_accum=2"):
        run_stage("pretrain", broken, {"tokenize": tokenize})


def listening_sockets(pids: list[int]) -> list[str]:
    """The local addresses (hex, as /proc/net shows them) of every TCP socket these processes listen on."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                addresses.append(fields[1].split(":")[0])
    return addresses


def is_loopback(hex_address: str) -> bool:
    # IPv4 (and IPv4-mapped IPv6) are little-endian words: 127.x.x.x ends in 7F; ::1 is its own form.
    return hex_address.endswith("7F") or hex_address == "00000000000000000000000001000000"


def start_group(folder: Path, behaviour: str, max_restarts: int = 0) -> tuple[threading.Thread, dict]:
    outcome = {}
    command = [sys.executable, str(HERE / "group_job.py"), str(folder), behaviour]

    def launch():
        outcome["returncode"] = run_group(command, 2, folder, max_restarts, env=ENV)

    thread = threading.Thread(target=launch, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(condition, what: str, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_one_node_group_listens_on_loopback_only(tmp_path):
    thread, outcome = start_group(tmp_path, "wait")
    wait_for(lambda: all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)), "both ranks to join")
    pids = [int((tmp_path / f"ready-{rank}").read_text()) for rank in (0, 1)]
    addresses = listening_sockets([os.getpid(), *pids])
    (tmp_path / "go").touch()
    thread.join(timeout=120)
    assert outcome["returncode"] == 0
    assert addresses, "gloo listens for its peers; finding none means the check looked in the wrong place"
    assert all(is_loopback(address) for address in addresses), addresses
    assert not (tmp_path / "group-store").exists()


def test_a_rank_that_trained_with_ddp_leaves_no_gloo_thread_running(tmp_path):
    # Were the group held past leave_group, gloo's threads would still run while the rank exits.
    thread, outcome = start_group(tmp_path, "ddp")
    thread.join(timeout=120)
    assert outcome["returncode"] == 0
    for rank in (0, 1):
        threads = (tmp_path / f"threads-{rank}").read_text().splitlines()
        assert threads  # the rank's main thread at least: the list was read
        assert not [name for name in threads if "gloo" in name], threads


def test_a_failed_rank_stops_the_group_which_restarts_but_not_after_a_user_error(tmp_path):
    thread, outcome = start_group(tmp_path, "fail-first", max_restarts=1)
    wait_for(lambda: all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)), "the restarted group")
    (tmp_path / "go").touch()
    thread.join(timeout=120)
    assert outcome["returncode"] == 0
    assert (tmp_path / "attempts-1").read_text() == "xx"

    again = tmp_path / "user-error"
    again.mkdir()
    thread, outcome = start_group(again, "user-error", max_restarts=3)
    # Rank 0 waits in the group for rank 1, which never comes: it is stopped, not waited for.
    thread.join(timeout=120)
    assert outcome["returncode"] == 2
    assert (again / "attempts-1").read_text() == "x"
