"""Pretraining from scratch on token shards (the book's chapter 5), with sample generations.

Under torchrun every rank runs `pretrain` on the same arguments; rank 0 alone logs and writes the
model, and the other ranks get None back.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from ..batches import ShardWindows
from ..config import ModelSpec
from ..distributed import Backend, join_group
from ..generate import generate
from ..model import GPTModel, Init
from ..settings import setting
from ..tokenizer import encode_with_end_of_text, get_tokenizer
from ..tracking import MetricLogger
from ..train import TrainResult, TrainSettings, train
from ..weights import save_model

MODEL_INFO = {"tokenizer": "gpt2", "recipe": "pretrain"}


@dataclass(frozen=True)
class PretrainSettings(TrainSettings):
    model: ModelSpec = setting(default_factory=ModelSpec, doc="the model's shape: a preset and overrides")
    init: Init = setting("gpt2", doc="weight initialisation; the book's is 'pytorch'")
    stride: int | None = setting(None, gt=0, doc="sliding-window stride; none: the context length")
    sample_prompt: str = setting("Every effort moves you", doc="prompt of the sample generation after each evaluation")
    sample_tokens: int = setting(25, ge=0, doc="tokens of each sample generation; 0: none")


@dataclass
class PretrainResult:
    model: GPTModel
    training: TrainResult
    model_dir: Path
    parameters: int
    device: str
    samples: list[str]


def shard_windows(settings: PretrainSettings, shards: dict) -> tuple[ShardWindows, ShardWindows]:
    """Train and validation windows of `shards` ({"train": {"shards": [...]}, "val": {...}}, as the
    tokenize stage writes them); raises up front when a split is too short for one window."""
    context = settings.model.build().context_length
    stride = settings.stride or context
    train_data = ShardWindows(shards["train"]["shards"], context, stride, settings.batch_size,
                              shuffle=True, drop_last=True, seed=settings.seed, split="train")
    val_data = ShardWindows(shards["val"]["shards"], context, stride, settings.batch_size,
                            shuffle=False, drop_last=False, seed=settings.seed, split="validation")
    return train_data, val_data


def pretrain(settings: PretrainSettings, shards: dict, out_dir: str | Path, *, logger: MetricLogger | None = None,
             backend: Backend = "auto", progress: bool = True) -> PretrainResult | None:
    """Train a new GPTModel into `out_dir` (checkpoints/, checkpoints/best/, model/), resuming
    from its checkpoints when they exist."""
    out_dir = Path(out_dir)
    group, device = join_group(settings.device, backend)
    train_data, val_data = shard_windows(settings, shards)
    tokenizer = get_tokenizer()
    prompt = encode_with_end_of_text(tokenizer, settings.sample_prompt)
    torch.manual_seed(settings.seed)
    model = GPTModel(settings.model.build(), init=settings.init)
    logger = logger if group.is_main else None
    samples = []

    def sample(step, record):
        if not settings.sample_tokens:
            return
        new = generate(model, [prompt], settings.sample_tokens)[0]
        text = settings.sample_prompt + tokenizer.decode(new)
        samples.append(f"step {step} (val loss {record.get('val_loss', float('nan')):.3f}): {text!r}")
        if logger:
            logger.log_text("\n".join(samples) + "\n", "samples.txt")

    if logger:
        sequences = settings.batch_size * settings.grad_accum * group.world_size
        logger.log_params({"train.world_size": group.world_size, "train.device": device.type,
                           "train.effective_batch_size": sequences,
                           "train.effective_batch_tokens": sequences * model.cfg.context_length})
    result = train(model, settings, train_data, val_data, out_dir / "checkpoints", device=device, logger=logger,
                   on_eval=sample, progress=progress,
                   on_best=lambda step, record: save_model(model, out_dir / "checkpoints" / "best", MODEL_INFO))
    if not group.is_main:
        return None
    model_dir = save_model(model.cpu(), out_dir / "model", MODEL_INFO)
    return PretrainResult(model=model, training=result, model_dir=model_dir, parameters=model.num_parameters(),
                          device=device.type, samples=samples)
