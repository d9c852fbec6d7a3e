"""Pretrain stage: train GPTModel from scratch on the tokenize stage's shards."""

from dataclasses import fields

import mlflow
import torch
from prefect import flow

from gpt_core.batches import ShardWindows
from gpt_core.files import sha256_file
from gpt_core.generate import generate
from gpt_core.model import GPTModel
from gpt_core.tokenizer import encode, get_tokenizer
from gpt_core.train import TrainSettings, train
from gpt_core.weights import save_model

from . import plots
from .manifest import latest_manifest
from .settings import PretrainConfig, Profile, TrainConfig
from .stage import run_stage
from .tracking import log_model


def train_settings(cfg: TrainConfig) -> TrainSettings:
    names = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**cfg.model_dump(include=names))


def log_step_metrics(metrics: dict, step: int):
    mlflow.log_metrics(metrics, step=step)


def run_pretrain(profile: Profile, tokenize: dict | None = None, force: bool = False) -> dict:
    upstream = {"tokenize": tokenize or latest_manifest(profile.data_dir, "tokenize")}
    cfg: PretrainConfig = profile.pretrain
    model_cfg = cfg.model.build()
    shards = upstream["tokenize"]["outputs"]["pretrain"]
    stride = cfg.stride or model_cfg.context_length
    # Built before the stage starts, so a corpus too short for one window fails up front.
    train_data = ShardWindows(shards["train"]["shards"], model_cfg.context_length, stride, cfg.batch_size,
                              shuffle=True, drop_last=True, seed=cfg.seed, split="train")
    val_data = ShardWindows(shards["val"]["shards"], model_cfg.context_length, stride, cfg.batch_size,
                            shuffle=False, drop_last=False, seed=cfg.seed, split="validation")

    def body(folder, _upstream):
        tokenizer = get_tokenizer()
        prompt = encode(tokenizer, cfg.sample_prompt)
        torch.manual_seed(cfg.seed)
        model = GPTModel(model_cfg, init=cfg.init)
        samples = []

        def sample(step, record):
            if not cfg.sample_tokens:
                return
            new = generate(model, [prompt], cfg.sample_tokens)[0]
            text = cfg.sample_prompt + tokenizer.decode(new)
            samples.append(f"step {step} (val loss {record.get('val_loss', float('nan')):.3f}): {text!r}")
            mlflow.log_text("\n".join(samples) + "\n", "samples.txt")

        info = {"tokenizer": "gpt2", "stage": "pretrain"}
        result = train(model, train_settings(cfg), train_data, val_data, folder / "checkpoints",
                       log=log_step_metrics, on_eval=sample, best_extra=info)
        model_dir = save_model(model, folder / "model", info)
        fig = plots.loss_curve(result.history, f"Pretraining {cfg.model.preset}")
        fig.savefig(folder / "loss.png", dpi=120)
        mlflow.log_figure(fig, "loss.png")
        plots.close(fig)
        model_uri = log_model(model_dir, cfg.registered_name, profile.mlflow_config)
        final = result.history[-1]
        outputs = {"model": str(model_dir), "model_sha256": sha256_file(model_dir / "model.safetensors"),
                   "best_model": str(folder / "checkpoints" / "best"), "model_uri": model_uri,
                   "loss_plot": str(folder / "loss.png"), "precision": result.precision}
        metrics = {"final/train_loss": final["train_loss"], "final/val_loss": final.get("val_loss"),
                   "final/val_perplexity": final.get("val_perplexity"), "best_val_loss": result.best_val_loss,
                   "steps": result.steps, "tokens_seen": result.tokens_seen,
                   "parameters": model.num_parameters()}
        return outputs, metrics

    return run_stage("pretrain", profile, cfg, upstream, body, force)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(profile: Profile, tokenize: dict | None = None, force: bool = False) -> dict:
    return run_pretrain(profile, tokenize, force)
