"""The pretraining itself, run in the stage's own process or in every process of a torchrun group.

`python -m torch.distributed.run ... -m flows.pretrain_worker LAUNCH_JSON` is what the pretrain
stage starts when its config asks for more than one process; on a multi-node run every other
node starts the same command (the stage prints it). Only rank 0 talks to MLflow, writing into
the stage's run through its id, and only rank 0 writes the model folder and `result.json`.
"""

import json
import sys
import time
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from gpt_core.batches import ShardWindows
from gpt_core.distributed import join_group, leave_group
from gpt_core.errors import GptflowError
from gpt_core.files import atomic_write_json
from gpt_core.generate import generate
from gpt_core.model import GPTModel
from gpt_core.tokenizer import encode, get_tokenizer
from gpt_core.train import train
from gpt_core.weights import save_model

from .settings import PretrainConfig

RESULT = "result.json"
ERROR = "worker-error.txt"


def shard_windows(cfg: PretrainConfig, shards: dict) -> tuple[ShardWindows, ShardWindows]:
    """The train and validation windows; raises up front when a split is too short for one window."""
    context = cfg.model.build().context_length
    stride = cfg.stride or context
    train_data = ShardWindows(shards["train"]["shards"], context, stride, cfg.batch_size,
                              shuffle=True, drop_last=True, seed=cfg.seed, split="train")
    val_data = ShardWindows(shards["val"]["shards"], context, stride, cfg.batch_size,
                            shuffle=False, drop_last=False, seed=cfg.seed, split="validation")
    return train_data, val_data


class RunLogger:
    """Writes into an MLflow run by id, so processes other than the one that opened it can log."""

    def __init__(self, run_id: str):
        self.client, self.run_id = MlflowClient(), run_id

    def metrics(self, values: dict, step: int):
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def params(self, values: dict):
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in values.items()])

    def text(self, text: str, name: str):
        self.client.log_text(self.run_id, text, name)


def train_model(cfg: PretrainConfig, shards: dict, folder: Path, run_id: str) -> dict | None:
    """Train from scratch into `folder`; returns the result record on rank 0, None on other ranks."""
    group, device = join_group(cfg.device, cfg.distributed.backend)
    train_data, val_data = shard_windows(cfg, shards)
    tokenizer = get_tokenizer()
    prompt = encode(tokenizer, cfg.sample_prompt)
    torch.manual_seed(cfg.seed)
    model = GPTModel(cfg.model.build(), init=cfg.init)
    logger = RunLogger(run_id) if group.is_main else None
    samples = []

    def sample(step, record):
        if not cfg.sample_tokens:
            return
        new = generate(model, [prompt], cfg.sample_tokens)[0]
        text = cfg.sample_prompt + tokenizer.decode(new)
        samples.append(f"step {step} (val loss {record.get('val_loss', float('nan')):.3f}): {text!r}")
        logger.text("\n".join(samples) + "\n", "samples.txt")

    if logger:
        sequences = cfg.batch_size * cfg.grad_accum * group.world_size
        logger.params({"train.world_size": group.world_size, "train.device": device.type,
                       "train.effective_batch_size": sequences,
                       "train.effective_batch_tokens": sequences * model.cfg.context_length})
    info = {"tokenizer": "gpt2", "stage": "pretrain"}
    result = train(model, cfg.train_settings(), train_data, val_data, folder / "checkpoints", device=device,
                   log=logger and logger.metrics, on_eval=logger and sample, best_extra=info)
    if not group.is_main:
        return None
    save_model(model.cpu(), folder / "model", info)
    record = {"steps": result.steps, "tokens_seen": result.tokens_seen, "history": result.history,
              "best_val_loss": result.best_val_loss, "precision": result.precision,
              "world_size": result.world_size, "device": device.type, "parameters": model.num_parameters()}
    atomic_write_json(folder / RESULT, record)
    return record


def main(argv: list[str] | None = None) -> int:
    [spec_path] = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    folder = Path(spec["folder"])
    mlflow.set_tracking_uri(spec["tracking_uri"])
    try:
        train_model(PretrainConfig.model_validate(spec["config"]), spec["shards"], folder, spec["run_id"])
    except GptflowError as err:
        # The stage's process reads this back, so the user sees the reason, not torchrun's trace.
        (folder / ERROR).write_text(str(err))
        print(f"gptflow: error: {err}", file=sys.stderr)
        return 2
    finally:
        leave_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
