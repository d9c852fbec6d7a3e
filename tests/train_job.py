"""A tiny pretraining run driven from the command line, for the crash/resume tests.

python train_job.py SHARD_DIR CHECKPOINT_DIR OUT_FILE [STEP_DELAY]
"""

import sys
import time
from pathlib import Path

import torch

from gpt_core.batches import ShardWindows
from gpt_core.config import get_preset
from gpt_core.model import GPTModel
from gpt_core.train import TrainSettings, train
from gpt_core.weights import save_model

SETTINGS = TrainSettings(epochs=2, max_steps=12, lr=1e-3, warmup_steps=2, min_lr=1e-4, eval_every=4,
                         eval_batches=2, checkpoint_every=1, precision="fp32", seed=7)


def data(shard_dir: Path):
    import pyarrow.parquet as pq
    def shards(split):
        return [{"path": str(p), "tokens": pq.read_metadata(p).num_rows} for p in sorted(shard_dir.glob(f"{split}-*.parquet"))]
    train_data = ShardWindows(shards("train"), 32, 16, 4, shuffle=True, drop_last=True, seed=7)
    val_data = ShardWindows(shards("val"), 32, 32, 4, shuffle=False, drop_last=False)
    return train_data, val_data


def main():
    shard_dir, checkpoint_dir, out = map(Path, sys.argv[1:4])
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPTModel(get_preset("gpt-nano", context_length=32))
    train_data, val_data = data(shard_dir)
    train(model, SETTINGS, train_data, val_data, checkpoint_dir, progress=False,
          log=lambda metrics, step: time.sleep(delay), peak_flops=1.0)
    save_model(model, out)


if __name__ == "__main__":
    main()
