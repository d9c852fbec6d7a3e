"""Pretrain stage: train GPTModel from scratch on the tokenize stage's shards.

With `distributed.nproc_per_node` above 1 the stage starts the ranks itself, on loopback only
(gpt_core.launcher); with `distributed.nnodes` above 1 it starts node 0 under torchrun, which
listens on the network for the other nodes. It waits for the group; rank 0 logs into this
stage's MLflow run, so one run and one checkpoint series come out either way.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from gpt_core.errors import GptflowError
from gpt_core.files import atomic_write_json, sha256_file
from gpt_core.launcher import run_group
from gpt_core.recipes.pretrain import PretrainSettings
from gpt_core.settings import setting

from . import plots
from .pretrain_worker import ERROR, RESULT, train_model
from .settings import DistributedConfig, config_dict, stage_config
from .tracking import ModelScore, load_config, log_datasets, log_figure, log_model

LAUNCH = "launch.json"


@stage_config
@dataclass(frozen=True)
class Config(PretrainSettings):
    distributed: DistributedConfig = setting(default_factory=DistributedConfig,
                                             doc="data-parallel training over several processes")
    registered_name: str = setting("gptflow-base", doc="MLflow registered model name")


def worker_command(launch_file) -> list[str]:
    return [sys.executable, "-m", "flows.pretrain_worker", str(launch_file)]


def torchrun_command(dist: DistributedConfig, launch_file, run_key: str) -> list[str]:
    """The command each node of a multi-node run runs; node 0's is started by the stage itself."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(dist.nnodes),
            "--nproc-per-node", str(dist.nproc_per_node), "--max-restarts", str(dist.max_restarts),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", dist.rdzv_endpoint, "--rdzv-id", run_key,
            *worker_command(launch_file)[1:]]


def launch_group(cfg: Config, shards: dict, folder, run_id: str, tracking_uri: str) -> dict:
    """Run the training as a group of processes and return rank 0's result record."""
    launch_file = folder / LAUNCH
    atomic_write_json(launch_file, {"config": config_dict(cfg), "shards": shards,
                                    "folder": str(folder.resolve()), "run_id": run_id,
                                    "tracking_uri": tracking_uri})
    for stale in (folder / ERROR, folder / RESULT):
        stale.unlink(missing_ok=True)
    dist = cfg.distributed
    env = dict(os.environ)
    if dist.backend != "nccl" and not torch.cuda.is_available():
        # CPU ranks share this node's cores; without this each rank would use all of them.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // dist.nproc_per_node)))
    if dist.nnodes > 1:
        command = torchrun_command(dist, launch_file.resolve(), folder.name)
        print(f"pretrain: waiting for {dist.nnodes - 1} more node(s); on each, in this project "
              f"folder with the same data folder mounted, run:\n  {' '.join(command)}")
        returncode = subprocess.run(command, env=env, check=False).returncode
    else:
        print(f"pretrain: starting {dist.world_size} training processes on this machine (loopback only)")
        returncode = run_group(worker_command(launch_file.resolve()), dist.world_size, folder,
                               dist.max_restarts, env)
    if (folder / ERROR).is_file():
        raise GptflowError((folder / ERROR).read_text())
    if returncode != 0 or not (folder / RESULT).is_file():
        raise GptflowError(f"distributed training failed (a rank exited with {returncode}); the ranks' "
                           "output above says why. Running the stage again resumes from the last checkpoint")
    return json.loads((folder / RESULT).read_text())


def run(ctx) -> tuple[dict, dict]:
    cfg: Config = ctx.config
    shards = ctx.upstream["tokenize"]["outputs"]["pretrain"]
    folder = ctx.folder
    log_datasets(shards, "pretrain")
    if cfg.distributed.world_size > 1:
        tracking_uri = load_config(ctx.profile.mlflow_config)["tracking_uri"]
        result = launch_group(cfg, shards, folder, ctx.run_id, tracking_uri)
    else:
        result = train_model(cfg, shards, folder, ctx.run_id)
    model_dir = folder / "model"
    log_figure(plots.loss_curve(result["history"], f"Pretraining {cfg.model.preset}"), folder, "loss.png")
    final = result["history"][-1]
    # The registered model is the final one, so it is its validation loss that is compared.
    registered = log_model(model_dir, cfg.registered_name, ctx.profile.mlflow_config,
                           score=ModelScore("final/val_loss", final.get("val_loss"), "min"))
    outputs = {"model": str(model_dir), "model_sha256": sha256_file(model_dir / "model.safetensors"),
               "best_model": str(folder / "checkpoints" / "best"), "model_uri": registered.uri,
               "model_version": registered.version, "loss_plot": str(folder / "loss.png"), "precision": result["precision"],
               "device": result["device"], "world_size": result["world_size"]}
    metrics = {"final/train_loss": final["train_loss"], "final/val_loss": final.get("val_loss"),
               "final/val_perplexity": final.get("val_perplexity"), "best_val_loss": result["best_val_loss"],
               "steps": result["steps"], "tokens_seen": result["tokens_seen"],
               "parameters": result["parameters"]}
    return outputs, metrics
