"""The training loop every stage uses (the book's chapter 5 loop with appendix D's extras).

AdamW with decoupled weight decay, linear warmup then cosine decay, gradient clipping,
gradient accumulation, bf16 autocast where the hardware has it, periodic evaluation,
crash-safe checkpoints with exact resume, and a stop on a non-finite loss. Under torchrun the
same loop is data-parallel: each rank trains on its share of the batches, gradients are
all-reduced, and only rank 0 logs and writes.
"""

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .batches import BatchSource, RankShare
from .checkpoint import CheckpointStore
from .compiled import Compile, compile_seconds, should_compile
from .distributed import Device, barrier, current_group, gather_objects, sum_across
from .errors import GptflowError
from .flops import training_flops_per_token
from .metrics import (
    COMPILE_SECONDS,
    LR,
    MFU,
    TOKENS_PER_SEC,
    TOKENS_SEEN,
    TRAIN_EVAL_LOSS,
    TRAIN_LOSS,
    VAL_LOSS,
    VAL_PERPLEXITY,
)
from .precision import Precision, autocast, peak_flops, resolve_precision
from .progress import Progress
from .settings import Settings, SettingsError, setting
from .tracking import MetricLogger

log = logging.getLogger("gptflow")


@dataclass(frozen=True)
class TrainSettings(Settings):
    """The optimisation loop every training recipe shares (the book's appendix D)."""

    epochs: int = setting(1, gt=0, doc="passes over the training data")
    max_steps: int | None = setting(None, gt=0, doc="stop after this many optimizer steps")
    batch_size: int = setting(8, gt=0, doc="sequences per micro-batch (per process of a training group)")
    grad_accum: int = setting(1, gt=0, doc="micro-batches per optimizer step")
    lr: float = setting(4e-4, gt=0, doc="peak learning rate")
    min_lr: float = setting(0.0, ge=0, doc="learning rate at the end of the cosine decay")
    weight_decay: float = setting(0.1, ge=0, doc="AdamW weight decay of the weight matrices")
    warmup_steps: int = setting(0, ge=0, doc="optimizer steps of linear warmup")
    grad_clip: float | None = setting(1.0, gt=0, doc="clip the gradient norm to this; none: no clipping")
    eval_every: int | None = setting(50, gt=0, doc="optimizer steps between evaluations; none: once per epoch")
    eval_batches: int | None = setting(None, gt=0, doc="batches per evaluation; none: the whole split")
    checkpoint_every: int = setting(100, gt=0, doc="optimizer steps between checkpoints")
    precision: Precision = setting("auto", doc="auto: bf16 autocast where the device runs it natively")
    device: Device = setting("auto", doc="auto: the GPU when there is one (a GPU per process of a training group), "
                                         "else the CPU")
    seed: int = setting(123, doc="seed of the initialisation, data order and dropout")
    compile: Compile = setting("auto", doc="torch.compile the training step: true, false, or auto (where "
                                           "the run is long enough to repay compiling; gpt_core.compiled)")

    def __post_init__(self):
        super().__post_init__()
        if self.min_lr > self.lr:
            raise SettingsError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")

    def loop_settings(self) -> dict:
        """The values the loop itself depends on: a checkpoint resumes only under the same ones.
        Compiling or not is how the same loop runs, so a checkpoint resumes either way."""
        return {f.name: getattr(self, f.name) for f in fields(TrainSettings) if f.name != "compile"}


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    history: list[dict] = field(default_factory=list)
    best_val_loss: float = math.inf
    precision: str = "fp32"
    resumed_from: int | None = None
    world_size: int = 1
    compiled: bool = False
    compile_seconds: float = 0.0  # spent compiling, in this process; not part of any step's time


def lm_loss(model, inputs, targets):
    """Next-token cross-entropy; targets of -100 (padding, masked prompts) do not count."""
    return model(inputs, targets=targets)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, cosine decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, settings: TrainSettings, device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise GptflowError("nothing to train: every parameter of the model is frozen")
    # Weight decay on matrices only (nanoGPT, litgpt): decaying biases and norm gains hurts.
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # The fused kernel is 3x faster than the per-tensor loop on CPU too (torch >= 2.4).
    fused = torch.device(device).type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=settings.lr, fused=fused or None)


def make_schedule(optimizer, settings: TrainSettings, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to min_lr over `total_steps` optimizer steps."""
    min_ratio = settings.min_lr / settings.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, settings.warmup_steps, min_ratio))


def _rank_share(source: BatchSource, even: bool) -> BatchSource:
    group = current_group()
    return RankShare(source, group.rank, group.world_size, even=even) if group.world_size > 1 else source


def steps_per_epoch(settings: TrainSettings, train_data: BatchSource) -> int:
    """Optimizer steps in one epoch of `train_data` for this process (its rank's share)."""
    batches = _rank_share(train_data, even=True).num_batches(0)
    steps = batches // settings.grad_accum
    if steps == 0:
        raise GptflowError(
            f"the training data gives {batches} batches per epoch per process, fewer than "
            f"grad_accum={settings.grad_accum}; lower batch_size or grad_accum")
    return steps


def total_steps(settings: TrainSettings, train_data: BatchSource) -> int:
    steps = settings.epochs * steps_per_epoch(settings, train_data)
    return steps if settings.max_steps is None else min(steps, settings.max_steps)


@torch.no_grad()
def mean_loss(model, source: BatchSource, loss_fn, device, precision: str, max_batches: int | None,
              epoch: int = 0) -> float:
    """Mean batch loss over `source`; in a process group, over every rank's batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for index, (inputs, targets) in enumerate(source.batches(epoch)):
        if max_batches is not None and index >= max_batches:
            break
        with autocast(device, precision):
            total += loss_fn(model, inputs.to(device), targets.to(device)).item()
        count += 1
    model.train(was_training)
    total, count = sum_across([total, count], device)
    return total / count if count else math.nan


def _rng_state(device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(tensors: dict[str, torch.Tensor], rank: int, device):
    torch.set_rng_state(tensors[f"rank{rank}.cpu"])
    if device.type == "cuda" and f"rank{rank}.cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rank{rank}.cuda"], device)


class Trainer:
    """One training run, in four parts: preparing (or resuming) the state, one optimizer step,
    an evaluation, a checkpoint; `fit()` strings them together.

    The optimizer and the schedule are built by the caller (make_optimizer, make_schedule), so
    a recipe can choose its own. `on_eval(step, record)` runs after every evaluation (sample
    generations, accuracies); `on_best(step, record)` after an evaluation that improved the best
    validation loss (recipes save the best model there). `logger` receives the per-step metrics.

    In a process group of W ranks (see gpt_core.distributed), `train_data` and `val_data` are
    the whole data: rank r takes batches r, r + W, ... of each epoch, so a step covers W
    batches, as one process with grad_accum multiplied by W would. Only rank 0 logs, runs the
    callbacks and writes checkpoints; `checkpoint_dir` must be one folder every rank can read.
    """

    def __init__(self, model, settings: TrainSettings, train_data: BatchSource, val_data: BatchSource | None,
                 checkpoint_dir: str | Path, *, optimizer, schedule, loss_fn: Callable = lm_loss, device="cpu",
                 logger: MetricLogger | None = None, on_eval: Callable[[int, dict], None] | None = None,
                 on_best: Callable[[int, dict], None] | None = None, progress: bool = True,
                 peak: float | None = None):
        self.model, self.settings, self.loss_fn = model, settings, loss_fn
        self.device = torch.device(device)
        self.group = current_group()
        self.precision = resolve_precision(self.device, settings.precision)
        self.optimizer, self.schedule = optimizer, schedule
        self.store = CheckpointStore(checkpoint_dir)
        main = self.group.is_main
        self.logger, self.on_eval, self.on_best = (logger, on_eval, on_best) if main else (None, None, None)
        self.progress = progress and main
        self.train_data = _rank_share(train_data, even=True)
        self.eval_train = _rank_share(train_data, even=False)
        self.eval_val = val_data and _rank_share(val_data, even=False)
        self.steps_per_epoch = steps_per_epoch(settings, train_data)
        self.total_steps = total_steps(settings, train_data)
        self.eval_every = settings.eval_every or self.steps_per_epoch
        model.to(self.device).train()
        # The MFU denominator is measured when the run starts (the best so far), never mid-run.
        self.peak = peak or (peak_flops(self.device, self.precision) if self.logger else None)
        self.result = self._prepare()
        self.ddp = self.group.world_size > 1
        self.trained = model
        if self.ddp:
            self.trained = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.result.compiled = self._decide_compile(settings)
        if self.result.compiled:
            self.trained = torch.compile(self.trained)

    def _decide_compile(self, settings: TrainSettings) -> bool:
        # The longest sequences a step can hold: an upper bound on the run's FLOPs.
        context = self.model.cfg.context_length
        step_flops = training_flops_per_token(self.model, context) * settings.batch_size * settings.grad_accum * context
        work = step_flops * (self.total_steps - self.result.steps)
        return should_compile(settings.compile, self.device, work,
                              lambda: self.peak or peak_flops(self.device, self.precision))

    def _prepare(self) -> TrainResult:
        """A fresh result, or the one the latest checkpoint holds with weights, optimizer,
        schedule and RNG restored."""
        if self.store.latest() is None:
            # Ranks draw different dropout masks; their weights start equal (DDP broadcasts rank 0's).
            torch.manual_seed(self.settings.seed + self.group.rank)
            return TrainResult(steps=0, tokens_seen=0, precision=self.precision, world_size=self.group.world_size)
        state, rng = self.store.load(self.model, self.optimizer, self.schedule)
        folder = self.store.folder
        if state["settings"] != self.settings.loop_settings():
            raise GptflowError(f"the checkpoint in {folder} was written with other training settings; "
                               "start in a new folder to train with these")
        if state.get("world_size", 1) != self.group.world_size:
            raise GptflowError(f"the checkpoint in {folder} was written by {state.get('world_size', 1)} "
                               f"process(es); resume it with that many, not {self.group.world_size}")
        _set_rng_state(rng, self.group.rank, self.device)
        if self.group.is_main:
            log.info("resuming from the checkpoint of step %d in %s", state["step"], folder)
        return TrainResult(steps=state["step"], tokens_seen=state["tokens_seen"], history=state["history"],
                           best_val_loss=state["best_val_loss"], precision=self.precision,
                           resumed_from=state["step"], world_size=self.group.world_size)

    def step(self, batches) -> dict:
        """One optimizer step over grad_accum micro-batches from `batches`; returns its metrics."""
        settings, device, result = self.settings, self.device, self.result
        started = time.perf_counter()
        compiling_before = compile_seconds() if result.compiled else 0.0
        loss_sum, tokens, seq_len = 0.0, 0, 0
        for micro_step in range(settings.grad_accum):
            inputs, targets = next(batches)
            if device.type == "cuda":
                inputs = inputs.pin_memory().to(device, non_blocking=True)
                targets = targets.pin_memory().to(device, non_blocking=True)
            # Gradients are all-reduced once per step, after the last micro-batch.
            syncing = not self.ddp or micro_step == settings.grad_accum - 1
            with contextlib.nullcontext() if syncing else self.trained.no_sync():
                with autocast(device, self.precision):
                    loss = self.loss_fn(self.trained, inputs.to(device), targets.to(device))
                (loss / settings.grad_accum).backward()
            loss_sum += loss.item()
            tokens += inputs.numel()
            seq_len = inputs.size(1)
        [loss_sum] = sum_across([loss_sum], device)
        step_loss = loss_sum / settings.grad_accum / self.group.world_size
        if not math.isfinite(step_loss):
            self.optimizer.zero_grad(set_to_none=True)
            last = self.store.latest()
            raise GptflowError(
                f"loss became {step_loss} at step {result.steps + 1}; stopped. "
                + (f"The last good checkpoint is {last}" if last else "No checkpoint was written yet")
                + "; try a lower lr or grad_clip")
        if settings.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.schedule.get_last_lr()[0]
        self.schedule.step()
        result.steps += 1
        result.tokens_seen += tokens * self.group.world_size
        elapsed = time.perf_counter() - started
        metrics = {}
        if result.compiled and (compiling := compile_seconds() - compiling_before) > 0:
            # The first step (and any recompilation) compiles: that time is reported on its own.
            result.compile_seconds += compiling
            metrics[COMPILE_SECONDS] = compiling
            elapsed = max(elapsed - compiling, 1e-9)
        metrics.update({TRAIN_LOSS: step_loss, LR: lr, TOKENS_PER_SEC: tokens * self.group.world_size / elapsed,
                        TOKENS_SEEN: result.tokens_seen})
        if self.peak:
            # Each rank does its own share of the work on its own device: MFU is per device.
            metrics[MFU] = training_flops_per_token(self.model, seq_len) * tokens / elapsed / self.peak
        return metrics

    def evaluate(self) -> dict:
        """Train and validation loss now; calls on_best when validation improved, then on_eval."""
        result, settings = self.result, self.settings
        record = {"step": result.steps, "tokens_seen": result.tokens_seen, "lr": self.schedule.get_last_lr()[0],
                  "train_loss": mean_loss(self.model, self.eval_train, self.loss_fn, self.device, self.precision,
                                          settings.eval_batches)}
        improved = False
        if self.eval_val is not None:
            record["val_loss"] = mean_loss(self.model, self.eval_val, self.loss_fn, self.device, self.precision,
                                           settings.eval_batches)
            record["val_perplexity"] = math.exp(min(record["val_loss"], 50))
            improved = record["val_loss"] < result.best_val_loss
            if improved:
                result.best_val_loss = record["val_loss"]
        result.history.append(record)
        if self.logger:
            logged = {TRAIN_EVAL_LOSS: record["train_loss"]}
            if "val_loss" in record:
                logged.update({VAL_LOSS: record["val_loss"], VAL_PERPLEXITY: record["val_perplexity"]})
            self.logger.log_metrics(logged, result.steps)
        log.info("step %d/%d: train loss %.4f%s", result.steps, self.total_steps, record["train_loss"],
                 f", val loss {record['val_loss']:.4f}" if "val_loss" in record else "")
        if improved and self.on_best:
            self.on_best(result.steps, record)
        if self.on_eval:
            self.on_eval(result.steps, record)
        return record

    def checkpoint(self):
        """Weights, optimizer, schedule, every rank's RNG and the history, written by rank 0."""
        result = self.result
        rng = {f"rank{rank}.{name}": tensor
               for rank, states in enumerate(gather_objects(_rng_state(self.device)))
               for name, tensor in states.items()}
        if self.group.is_main:
            self.store.save(result.steps, self.model, self.optimizer, self.schedule, {
                "step": result.steps, "tokens_seen": result.tokens_seen, "history": result.history,
                "best_val_loss": result.best_val_loss, "settings": self.settings.loop_settings(),
                "world_size": self.group.world_size}, rng)
        barrier()

    def fit(self) -> TrainResult:
        """Train to total_steps from wherever the run stands, evaluating and checkpointing on schedule."""
        result, settings = self.result, self.settings
        if result.steps == 0 and result.resumed_from is None:
            self.evaluate()
        bar = Progress(self.total_steps, "train", "step", initial=result.steps, enabled=self.progress)
        while result.steps < self.total_steps:
            epoch, step_in_epoch = divmod(result.steps, self.steps_per_epoch)
            batches = self.train_data.batches(epoch, skip=step_in_epoch * settings.grad_accum)
            for _ in range(step_in_epoch, self.steps_per_epoch):
                metrics = self.step(batches)
                bar.note(f"loss {metrics[TRAIN_LOSS]:.3f}")
                bar.update(1)
                if self.logger:
                    self.logger.log_metrics(metrics, result.steps)
                last_step = result.steps == self.total_steps
                if result.steps % self.eval_every == 0 or last_step:
                    self.evaluate()
                if result.steps % settings.checkpoint_every == 0 or last_step:
                    self.checkpoint()
                if last_step:
                    break
        bar.close()
        return result


def train(model, settings: TrainSettings, train_data: BatchSource, val_data: BatchSource | None,
          checkpoint_dir: str | Path, *, loss_fn: Callable = lm_loss, device="cpu", **callbacks) -> TrainResult:
    """Train `model` in place with AdamW and the warmup-cosine schedule, resuming from
    `checkpoint_dir` when it holds a checkpoint; `callbacks` are Trainer's keyword options."""
    optimizer = make_optimizer(model, settings, device)
    schedule = make_schedule(optimizer, settings, total_steps(settings, train_data))
    return Trainer(model, settings, train_data, val_data, checkpoint_dir, optimizer=optimizer, schedule=schedule,
                   loss_fn=loss_fn, device=device, **callbacks).fit()
