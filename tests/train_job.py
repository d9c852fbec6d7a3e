"""A tiny pretraining run driven from the command line, for the crash/resume and torchrun tests.

python train_job.py SHARD_DIR CHECKPOINT_DIR OUT_FILE [STEP_DELAY [BATCH_SIZE]]
torchrun --nproc-per-node N train_job.py ...   (the same run, data-parallel over N gloo processes)
"""

import sys
import time
from pathlib import Path

import torch

from gpt_core.batches import ShardWindows
from gpt_core.config import get_preset
from gpt_core.distributed import join_group, leave_group
from gpt_core.model import GPTModel
from gpt_core.train import TrainSettings, train
from gpt_core.weights import save_model

SETTINGS = TrainSettings(epochs=2, max_steps=12, lr=1e-3, warmup_steps=2, min_lr=1e-4, eval_every=4,
                         eval_batches=2, checkpoint_every=1, precision="fp32", seed=7)


class SlowLogger:
    """Takes `delay` seconds per step's metrics, so a test can kill the job between checkpoints."""

    def __init__(self, delay: float):
        self.delay = delay

    def log_metrics(self, metrics, step):
        time.sleep(self.delay)

    def log_params(self, params):
        pass

    def log_text(self, text, name):
        pass


def data(shard_dir: Path, batch_size: int = 4):
    import pyarrow.parquet as pq
    def shards(split):
        return [{"path": str(p), "tokens": pq.read_metadata(p).num_rows} for p in sorted(shard_dir.glob(f"{split}-*.parquet"))]
    train_data = ShardWindows(shards("train"), 32, 16, batch_size, shuffle=True, drop_last=True, seed=7)
    val_data = ShardWindows(shards("val"), 32, 32, batch_size, shuffle=False, drop_last=False)
    return train_data, val_data


def main():
    shard_dir, checkpoint_dir, out = map(Path, sys.argv[1:4])
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    batch_size = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    torch.set_num_threads(1)
    group, _ = join_group("cpu")
    torch.manual_seed(0)
    model = GPTModel(get_preset("gpt-nano", context_length=32))
    train_data, val_data = data(shard_dir, batch_size)
    train(model, SETTINGS, train_data, val_data, checkpoint_dir, progress=False,
          logger=SlowLogger(delay), peak=1.0, on_best=lambda step, record: save_model(model, checkpoint_dir / "best"))
    if group.is_main:
        save_model(model, out)
    leave_group()


if __name__ == "__main__":
    main()
