"""Instruct stage: fine-tune a base model to follow instructions (the book's chapter 7) and write
its answers to the test split, which the judge stage scores."""

import json
import logging
import tempfile
from functools import partial
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from prefect import flow
from tqdm import tqdm

from gpt_core.batches import DatasetBatches
from gpt_core.distributed import pick_device
from gpt_core.errors import GptflowError
from gpt_core.files import sha256_file
from gpt_core.instruct import InstructionDataset, collate, generate_responses
from gpt_core.lora import inject_lora, merge_lora
from gpt_core.supervised import read_instructions
from gpt_core.tokenizer import get_tokenizer
from gpt_core.train import train
from gpt_core.weights import load_model, save_model

from . import plots
from .base_model import base_model_path, base_model_upstream
from .manifest import latest_manifest
from .pretrain import log_step_metrics
from .settings import InstructConfig, Profile
from .stage import cached_output, run_stage
from .tracking import log_model

log = logging.getLogger("gptflow")
SPLITS = ("train", "validation", "test")


def check_prompts(datasets: dict[str, InstructionDataset], entries: dict[str, list[dict]], max_length: int):
    """overflow='error': refuse, up front, any prompt that would be cut.

    A cut training prompt leaves no response token to learn from, and a cut test prompt loses the
    start of its instruction; either way the example would silently stop being what it says.
    """
    for split, dataset in datasets.items():
        for example in dataset.examples:
            if example.prompt_length > max_length:
                instruction = entries[split][example.index]["instruction"]
                raise GptflowError(
                    f"instruct: {split} example #{example.index} ({instruction[:60]!r}) has a "
                    f"{example.prompt_length}-token prompt, longer than the {max_length} tokens allowed "
                    "(instruct.allowed_max_length, capped at the model's context): shorten it, raise "
                    "instruct.allowed_max_length or set instruct.overflow=truncate")


def log_table(frame: pd.DataFrame, artifact_file: str):
    """mlflow.log_table, except that a table left by a crashed attempt of this (resumed) run is
    replaced: mlflow.log_table would append the rows again."""
    run_id = mlflow.active_run().info.run_id
    if not any(a.path == artifact_file for a in MlflowClient().list_artifacts(run_id)):
        mlflow.log_table(data=frame, artifact_file=artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / artifact_file
        frame.to_json(path, orient="split", index=False, date_format="iso")  # log_table's format
        mlflow.log_artifact(str(path))


def run_instruct(profile: Profile, tokenize: dict | None = None, pretrain: dict | None = None,
                 force: bool = False) -> dict:
    cfg: InstructConfig = profile.instruct
    upstream = {"tokenize": tokenize or latest_manifest(profile.data_dir, "tokenize"),
                **base_model_upstream(profile, cfg.base_model, pretrain)}
    previous = cached_output("instruct", profile, cfg, upstream, force)
    if previous is not None:  # reused: skip loading the model and data for the up-front checks
        return previous
    splits = upstream["tokenize"]["outputs"].get("instruct")
    if splits is None:
        raise GptflowError("the tokenize stage prepared no instruction data: add instruction-data to "
                           "download.sources, then run the download and tokenize stages")
    # Device, model, data and the overflow check come before the stage starts, so bad input fails up front.
    device = pick_device(cfg.device)
    model, _ = load_model(base_model_path(cfg.base_model, upstream), drop_rate=cfg.drop_rate)
    max_length = min(cfg.allowed_max_length or model.cfg.context_length, model.cfg.context_length)
    tokenizer = get_tokenizer()
    entries = {split: read_instructions(splits[split]["json_path"]) for split in SPLITS}
    datasets = {split: InstructionDataset(entries[split], tokenizer, cfg.style) for split in SPLITS}
    if cfg.overflow == "error":
        check_prompts(datasets, entries, max_length)
    collate_fn = partial(collate, allowed_max_length=max_length, mask_prompt=cfg.mask_prompt,
                         overflow=cfg.overflow)
    train_data = DatasetBatches(datasets["train"], cfg.batch_size, collate_fn, shuffle=True, drop_last=True,
                                seed=cfg.seed)
    val_data = DatasetBatches(datasets["validation"], cfg.batch_size, collate_fn, shuffle=False,
                              drop_last=False)

    def body(folder, _upstream):
        # Examples longer than max_length lose their end in training, as in the book; count them
        # so that is never silent.
        truncated = sum(len(ex.tokens) - 1 > max_length
                        for split in ("train", "validation") for ex in datasets[split].examples)
        if truncated:
            log.warning("instruct: %d training/validation examples are longer than %d tokens and are "
                        "truncated", truncated, max_length)
        if cfg.lora is not None:
            inject_lora(model, **cfg.lora.model_dump())
        trainable = model.num_parameters(trainable_only=True)

        info = {"tokenizer": "gpt2", "stage": "instruct", "style": cfg.style}
        result = train(model, cfg.train_settings(), train_data, val_data, folder / "checkpoints", device=device,
                       log=log_step_metrics, best_extra=info)
        if cfg.lora is not None:
            merge_lora(model)
        model_dir = save_model(model, folder / "model", info)
        fig = plots.loss_curve(result.history, f"Instruction fine-tuning ({cfg.style})")
        fig.savefig(folder / "loss.png", dpi=120)
        mlflow.log_figure(fig, "loss.png")
        plots.close(fig)

        test = entries["test"]
        with tqdm(total=len(test), desc="responses", unit="response") as bar:
            answers = generate_responses(model, tokenizer, test, style=cfg.style,
                                         max_new_tokens=cfg.max_new_tokens,
                                         batch_size=cfg.generation_batch_size,
                                         progress=lambda done, _total: bar.update(done - bar.n))
        responses = [{**entry, "model_response": answer} for entry, answer in zip(test, answers)]
        (folder / "responses.json").write_text(json.dumps(responses, indent=1, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        frame = pd.DataFrame(responses, columns=["instruction", "input", "output", "model_response"])
        frame.to_parquet(folder / "responses.parquet", index=False)
        log_table(frame, "responses.json")

        model_uri = log_model(model_dir, cfg.registered_name, profile.mlflow_config)
        before, after = result.history[0], result.history[-1]
        outputs = {"model": str(model_dir), "model_sha256": sha256_file(model_dir / "model.safetensors"),
                   "model_uri": model_uri, "style": cfg.style, "loss_plot": str(folder / "loss.png"),
                   "responses": str(folder / "responses.json"),
                   "responses_sha256": sha256_file(folder / "responses.json"),
                   "responses_parquet": str(folder / "responses.parquet"),
                   "responses_parquet_sha256": sha256_file(folder / "responses.parquet"),
                   "precision": result.precision,
                   "counts": {split: len(entries[split]) for split in SPLITS}}
        metrics = {"val_loss_before": before["val_loss"], "val_loss_after": after["val_loss"],
                   "final/train_loss": after["train_loss"], "best_val_loss": result.best_val_loss,
                   "steps": result.steps, "tokens_seen": result.tokens_seen,
                   "trainable_parameters": trainable, "truncated_examples": truncated,
                   "n_responses": len(responses),
                   "n_empty_responses": sum(not answer.strip() for answer in answers)}
        return outputs, metrics

    return run_stage("instruct", profile, cfg, upstream, body, force)


@flow(name="instruct", log_prints=True)
def instruct_flow(profile: Profile, tokenize: dict | None = None, pretrain: dict | None = None,
                  force: bool = False) -> dict:
    return run_instruct(profile, tokenize, pretrain, force)
