"""Instruction fine-tuning (the book's chapter 7), then the model's answers to the test split.

All weights train, or LoRA adapters do (merged before the model is saved). Examples longer than
the allowed length lose their end in training, as in the book, and are counted so that is never
silent; `overflow="error"` refuses, up front, any prompt that would be cut.
"""

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..batches import DatasetBatches
from ..compiled import Compile, should_compile_decoding
from ..distributed import pick_device
from ..errors import GptflowError
from ..instruct import InstructionDataset, Overflow, collate, generate_responses
from ..lora import LoraSettings, inject_lora, merge_lora
from ..model import GPTModel
from ..progress import Progress
from ..prompts import Style
from ..settings import setting
from ..tokenizer import get_tokenizer
from ..tracking import MetricLogger
from ..train import TrainResult, TrainSettings, train
from ..weights import load_model, save_model

log = logging.getLogger("gptflow")
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class InstructSettings(TrainSettings):
    style: Style = setting("alpaca", doc="prompt format the model learns")
    mask_prompt: bool = setting(False, doc="learn only the response tokens, not the prompt's")
    allowed_max_length: int | None = setting(1024, gt=0, doc="truncate examples; capped at the model context")
    overflow: Overflow = setting("truncate", doc="what a prompt longer than allowed_max_length does: truncate "
                                                 "(the book) or error")
    lora: LoraSettings | None = setting(None, doc="fine-tune LoRA adapters instead of all weights")
    drop_rate: float = setting(0.0, ge=0, lt=1, doc="dropout while fine-tuning")
    epochs: int = setting(2, gt=0, doc="passes over the training split")
    lr: float = setting(5e-5, gt=0, doc="peak learning rate")
    max_new_tokens: int = setting(256, gt=0, doc="length limit of each test answer")
    generation_batch_size: int = setting(8, gt=0, doc="test prompts answered together")
    generation_compile: Compile = setting("auto", doc="torch.compile the decode step answering the test set: "
                                                      "true, false, or auto (on CUDA only; gpt_core.compiled)")


@dataclass
class PreparedInstructions:
    """Everything checked and loaded before training starts: bad input fails here, before any
    output is written."""

    model: GPTModel
    settings: InstructSettings
    datasets: dict[str, InstructionDataset]
    entries: Mapping[str, Sequence[dict]]
    max_length: int
    device: torch.device


@dataclass
class InstructResult:
    model: GPTModel
    training: TrainResult
    model_dir: Path
    responses: list[dict]  # each test entry with its "model_response"
    truncated_examples: int
    trainable_parameters: int


def check_prompts(datasets: dict[str, InstructionDataset], entries: Mapping[str, Sequence[dict]], max_length: int):
    """Refuse any prompt that would be cut: a cut training prompt leaves no response token to
    learn from, and a cut test prompt loses the start of its instruction."""
    for split, dataset in datasets.items():
        for example in dataset.examples:
            if example.prompt_length > max_length:
                instruction = entries[split][example.index]["instruction"]
                raise GptflowError(
                    f"instruct: {split} example #{example.index} ({instruction[:60]!r}) has a "
                    f"{example.prompt_length}-token prompt, longer than the {max_length} tokens allowed "
                    "(allowed_max_length, capped at the model's context): shorten it, raise "
                    "allowed_max_length or set overflow=truncate")


def prepare_instructions(base_model: str | Path, settings: InstructSettings,
                         entries: Mapping[str, Sequence[dict]]) -> PreparedInstructions:
    """Check the device, load `base_model` (a model folder or OpenAI preset) and encode `entries`
    ({"train", "validation", "test"}: lists of instruction/input/output dicts)."""
    device = pick_device(settings.device)
    model, _ = load_model(base_model, drop_rate=settings.drop_rate)
    max_length = min(settings.allowed_max_length or model.cfg.context_length, model.cfg.context_length)
    tokenizer = get_tokenizer()
    datasets = {split: InstructionDataset(entries[split], tokenizer, settings.style) for split in SPLITS}
    if settings.overflow == "error":
        check_prompts(datasets, entries, max_length)
    return PreparedInstructions(model, settings, datasets, entries, max_length, device)


def fine_tune_instructions(prepared: PreparedInstructions, out_dir: str | Path, *,
                           logger: MetricLogger | None = None, progress: bool = True) -> InstructResult:
    """Fine-tune the prepared model into `out_dir` (checkpoints/, model/), then answer every test entry."""
    out_dir = Path(out_dir)
    model, settings, datasets, entries = prepared.model, prepared.settings, prepared.datasets, prepared.entries
    max_length, device, tokenizer = prepared.max_length, prepared.device, get_tokenizer()
    collate_fn = partial(collate, allowed_max_length=max_length, mask_prompt=settings.mask_prompt,
                         overflow=settings.overflow)
    train_data = DatasetBatches(datasets["train"], settings.batch_size, collate_fn, shuffle=True, drop_last=True,
                                seed=settings.seed)
    val_data = DatasetBatches(datasets["validation"], settings.batch_size, collate_fn, shuffle=False,
                              drop_last=False)
    truncated = sum(len(ex.tokens) - 1 > max_length
                    for split in ("train", "validation") for ex in datasets[split].examples)
    if truncated:
        log.warning("instruct: %d training/validation examples are longer than %d tokens and are truncated",
                    truncated, max_length)
    if settings.lora is not None:
        inject_lora(model, settings.lora)
    trainable = model.num_parameters(trainable_only=True)
    info = {"tokenizer": "gpt2", "recipe": "instruct", "style": settings.style}
    result = train(model, settings, train_data, val_data, out_dir / "checkpoints", device=device, logger=logger,
                   on_best=lambda step, record: save_model(model, out_dir / "checkpoints" / "best", info),
                   progress=progress)
    if settings.lora is not None:
        merge_lora(model)
    model_dir = save_model(model, out_dir / "model", info)

    test = list(entries["test"])
    with Progress(len(test), "responses", "response", enabled=progress) as bar:
        answers = generate_responses(model, tokenizer, test, style=settings.style,
                                     max_new_tokens=settings.max_new_tokens,
                                     batch_size=settings.generation_batch_size,
                                     compiled=should_compile_decoding(settings.generation_compile, device),
                                     progress=lambda done, _total: bar.update(done - bar.n))
    responses = [{**entry, "model_response": answer} for entry, answer in zip(test, answers)]
    return InstructResult(model=model, training=result, model_dir=model_dir, responses=responses,
                          truncated_examples=truncated, trainable_parameters=trainable)
