"""`gptflow bench ddp`: data-parallel training (a gloo group, started as the stage starts it) against
one process, same cores.

Both sides train gpt-mini (context 128) on tiny Shakespeare with the same effective batch of 16
sequences per step: one process using every core, against one rank per core with a micro-batch
of 16 / ranks. The ratio of their tokens/s is what data parallelism costs here (all-reduce,
duplicated optimizer work, process overhead); on one machine there is no extra compute to win.
GPTFLOW_BENCH_STEPS sets the timed steps (after WARMUP untimed ones).
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt_core.launcher import run_group

from ..resources import SOURCES_MANIFEST
from .common import emit, env_int

WARMUP = 3
EFFECTIVE_BATCH = 16



class StepClock:
    """A metric logger that only notes when each step's metrics arrive."""

    def __init__(self, stamps: list[float]):
        self.stamps = stamps

    def log_metrics(self, metrics, step):
        self.stamps.append(time.perf_counter())

    def log_params(self, params):
        pass

    def log_text(self, text, name):
        pass

def worker(shard_dir: str, batch_size: int, steps: int, out: str):
    """One side (a lone process, or every rank of a group): trains and reports per-step seconds."""
    import pyarrow.parquet as pq

    from gpt_core.batches import ShardWindows
    from gpt_core.config import get_preset
    from gpt_core.distributed import join_group, leave_group
    from gpt_core.model import GPTModel
    from gpt_core.train import TrainSettings, train

    group, device = join_group("cpu")
    shards = [{"path": str(p), "tokens": pq.read_metadata(p).num_rows} for p in sorted(Path(shard_dir).glob("train-*"))]
    data = ShardWindows(shards, 128, 128, batch_size, shuffle=True, drop_last=True)
    stamps = []
    settings = TrainSettings(max_steps=WARMUP + steps, eval_every=10_000, checkpoint_every=10_000, eval_batches=1,
                             lr=1e-3)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as checkpoints:
        train(GPTModel(get_preset("gpt-mini", context_length=128)), settings, data, None, checkpoints,
              device=device, progress=False, peak=1.0, logger=StepClock(stamps))
    if group.is_main:
        seconds = [b - a for a, b in zip(stamps[WARMUP - 1:], stamps[WARMUP:])]
        Path(out).write_text(json.dumps({"step_seconds": statistics.median(seconds),
                                         "ranks": group.world_size, "threads": torch.get_num_threads()}))
    leave_group()


def _side(ranks: int, shard_dir: Path, steps: int, out: Path) -> dict:
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    command = [sys.executable, "-m", "flows.bench.ddp", "worker", str(shard_dir), str(EFFECTIVE_BATCH // ranks),
               str(steps), str(out)]
    if ranks > 1:
        returncode = run_group(command, ranks, out.parent, env=env)
        if returncode != 0:
            raise RuntimeError(f"the {ranks}-rank group exited with {returncode}")
    else:
        subprocess.run(command, env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    result["tokens_per_sec"] = round(EFFECTIVE_BATCH * 128 / result["step_seconds"], 1)
    return result


def main(as_json: bool = False):
    from gpt_core.download import fetch, load_sources
    from gpt_core.shards import tokenize_corpora

    steps = env_int("GPTFLOW_BENCH_STEPS", 10)
    ranks = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-ddp-") as tmp:
        tmp = Path(tmp)
        corpus = fetch(load_sources(SOURCES_MANIFEST)["tinyshakespeare"], tmp / "source", progress=False)
        tokenize_corpora([corpus], tmp / "shards", shard_tokens=1_000_000, val_fraction=0.1, workers=0,
                         progress=False)
        single = _side(1, tmp / "shards", steps, tmp / "single.json")
        group = _side(ranks, tmp / "shards", steps, tmp / "group.json") if ranks > 1 else None
    result = {"benchmark": "ddp", "model": "gpt-mini, context 128", "effective_batch": EFFECTIVE_BATCH,
              "one_process": single, "gloo_group": group,
              "ratio": group and round(group["tokens_per_sec"] / single["tokens_per_sec"], 2)}
    lines = [f"DDP on {ranks} CPU cores, gpt-mini, effective batch {EFFECTIVE_BATCH} x 128 tokens",
             f"  one process, {single['threads']} threads: {single['tokens_per_sec']} tok/s"]
    if group:
        lines.append(f"  {ranks} gloo ranks, {group['threads']} thread(s) each: {group['tokens_per_sec']} tok/s "
                     f"({result['ratio']}x)")
    else:
        lines.append("  one core only: no group to compare")
    emit(result, as_json, lines)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        main("--json" in sys.argv)
