"""The training loop every stage uses (the book's chapter 5 loop with appendix D's extras).

AdamW with decoupled weight decay, linear warmup then cosine decay, gradient clipping,
gradient accumulation, bf16 autocast where the hardware has it, periodic evaluation,
crash-safe checkpoints with exact resume, and a stop on a non-finite loss. Under torchrun the
same loop is data-parallel: each rank trains on its share of the batches, gradients are
all-reduced, and only rank 0 logs and writes.
"""

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .batches import BatchSource, RankShare
from .checkpoint import CheckpointStore
from .distributed import barrier, current_group, gather_objects, sum_across
from .errors import GptflowError
from .precision import autocast, measure_peak_flops, resolve_precision
from .weights import save_model


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 1
    max_steps: int | None = None
    grad_accum: int = 1
    lr: float = 4e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_batches: int | None = None
    checkpoint_every: int = 100
    precision: str = "auto"
    seed: int = 123


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    history: list[dict] = field(default_factory=list)
    best_val_loss: float = math.inf
    precision: str = "fp32"
    resumed_from: int | None = None
    world_size: int = 1


def lm_loss(model, inputs, targets):
    """Next-token cross-entropy; targets of -100 (padding, masked prompts) do not count."""
    logits = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


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


def flops_per_token(model, context_length: int) -> float:
    """nanoGPT's estimate (PaLM appendix B): 6N + 12·L·H·Q·T for one token's forward + backward."""
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    return 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context_length


@torch.no_grad()
def evaluate(model, source: BatchSource, loss_fn, device, precision: str, max_batches: int | None,
             epoch: int = 0) -> float:
    """Mean batch loss; in a process group, over every rank's batches."""
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


def train(model, settings: TrainSettings, train_data: BatchSource, val_data: BatchSource | None,
          checkpoint_dir: str | Path, *, loss_fn: Callable = lm_loss, device="cpu",
          on_eval: Callable[[int, dict], None] | None = None, log: Callable[[dict, int], None] | None = None,
          progress: bool = True, peak_flops: float | None = None, best_extra: dict | None = None) -> TrainResult:
    """Train `model` in place, resuming from `checkpoint_dir` when it holds a checkpoint.

    `log(metrics, step)` receives per-step metrics; `on_eval(step, record)` runs after every
    evaluation (stages use it for sample generations). The best validation weights are saved in
    `checkpoint_dir/best` as a model folder, with `best_extra` in its config.json.

    In a process group of W ranks (see gpt_core.distributed), `train_data` and `val_data` are
    the whole data: rank r takes batches r, r + W, ... of each epoch, so a step covers W
    batches, as one process with grad_accum multiplied by W would. Only rank 0 logs, evaluates
    callbacks and writes checkpoints; `checkpoint_dir` must be one folder every rank can read.
    """
    device = torch.device(device)
    group = current_group()
    precision = resolve_precision(device, settings.precision)
    model.to(device).train()
    eval_train, eval_val = train_data, val_data
    if group.world_size > 1:
        train_data = RankShare(train_data, group.rank, group.world_size)
        eval_train = RankShare(eval_train, group.rank, group.world_size, even=False)
        eval_val = val_data and RankShare(val_data, group.rank, group.world_size, even=False)
    if not group.is_main:
        log = on_eval = None
        progress = False
    steps_per_epoch = train_data.num_batches(0) // settings.grad_accum
    if steps_per_epoch == 0:
        raise GptflowError(
            f"the training data gives {train_data.num_batches(0)} batches per epoch per process, fewer than "
            f"grad_accum={settings.grad_accum}; lower batch_size or grad_accum")
    total_steps = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total_steps = min(total_steps, settings.max_steps)
    optimizer = make_optimizer(model, settings, device)
    min_ratio = settings.min_lr / settings.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, settings.warmup_steps, min_ratio))
    store = CheckpointStore(checkpoint_dir)

    flops = flops_per_token(model, model.cfg.context_length) if hasattr(model, "cfg") else None
    # Measured before seeding or restoring, since the benchmark's random inputs consume RNG state.
    if peak_flops is None and log is not None and flops:
        peak_flops = measure_peak_flops(device, precision)

    result = TrainResult(steps=0, tokens_seen=0, precision=precision, world_size=group.world_size)
    if store.latest() is not None:
        state, rng = store.load(model, optimizer, scheduler)
        if state["settings"] != asdict(settings):
            raise GptflowError(f"the checkpoint in {checkpoint_dir} was written with other training settings; "
                               "start in a new folder to train with these")
        if state.get("world_size", 1) != group.world_size:
            raise GptflowError(f"the checkpoint in {checkpoint_dir} was written by {state.get('world_size', 1)} "
                               f"process(es); resume it with that many, not {group.world_size}")
        _set_rng_state(rng, group.rank, device)
        result = TrainResult(steps=state["step"], tokens_seen=state["tokens_seen"], history=state["history"],
                             best_val_loss=state["best_val_loss"], precision=precision, resumed_from=state["step"],
                             world_size=group.world_size)
    else:
        # Ranks draw different dropout masks; their weights start equal (DDP broadcasts rank 0's).
        torch.manual_seed(settings.seed + group.rank)
    trained = model
    if group.world_size > 1:
        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint():
        rng = {f"rank{rank}.{name}": tensor
               for rank, states in enumerate(gather_objects(_rng_state(device))) for name, tensor in states.items()}
        if group.is_main:
            store.save(result.steps, model, optimizer, scheduler, {
                "step": result.steps, "tokens_seen": result.tokens_seen, "history": result.history,
                "best_val_loss": result.best_val_loss, "settings": asdict(settings),
                "world_size": group.world_size}, rng)
        barrier()

    def run_eval():
        record = {"step": result.steps, "tokens_seen": result.tokens_seen,
                  "train_loss": evaluate(model, eval_train, loss_fn, device, precision, settings.eval_batches),
                  "lr": scheduler.get_last_lr()[0]}
        if eval_val is not None:
            record["val_loss"] = evaluate(model, eval_val, loss_fn, device, precision, settings.eval_batches)
            record["val_perplexity"] = math.exp(min(record["val_loss"], 50))
            if record["val_loss"] < result.best_val_loss:
                result.best_val_loss = record["val_loss"]
                if group.is_main:
                    save_model(model, Path(checkpoint_dir) / "best", best_extra)
        result.history.append(record)
        if log:
            log({f"eval/{k}": v for k, v in record.items() if k != "step"}, result.steps)
        if on_eval:
            on_eval(result.steps, record)

    if result.steps == 0 and result.resumed_from is None:
        run_eval()

    bar = tqdm(total=total_steps, initial=result.steps, disable=not progress, desc="train", unit="step")
    while result.steps < total_steps:
        epoch, step_in_epoch = divmod(result.steps, steps_per_epoch)
        batches = train_data.batches(epoch, skip=step_in_epoch * settings.grad_accum)
        for _ in range(step_in_epoch, steps_per_epoch):
            started = time.perf_counter()
            loss_sum, tokens = 0.0, 0
            for micro_step in range(settings.grad_accum):
                inputs, targets = next(batches)
                if device.type == "cuda":
                    inputs = inputs.pin_memory().to(device, non_blocking=True)
                    targets = targets.pin_memory().to(device, non_blocking=True)
                # Gradients are all-reduced once per step, after the last micro-batch.
                syncing = trained is model or micro_step == settings.grad_accum - 1
                with contextlib.nullcontext() if syncing else trained.no_sync():
                    with autocast(device, precision):
                        loss = loss_fn(trained, inputs.to(device), targets.to(device))
                    (loss / settings.grad_accum).backward()
                loss_sum += loss.item()
                tokens += inputs.numel()
            [loss_sum] = sum_across([loss_sum], device)
            step_loss = loss_sum / settings.grad_accum / group.world_size
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                last = store.latest()
                raise GptflowError(
                    f"loss became {step_loss} at step {result.steps + 1}; stopped. "
                    + (f"The last good checkpoint is {last}" if last else "No checkpoint was written yet")
                    + "; try a lower lr or grad_clip")
            if settings.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            result.steps += 1
            result.tokens_seen += tokens * group.world_size
            elapsed = time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if log:
                metrics = {"train/loss": step_loss, "lr": lr, "tokens_per_sec": tokens * group.world_size / elapsed,
                           "tokens_seen": result.tokens_seen}
                if flops and peak_flops:
                    metrics["mfu"] = flops * tokens / elapsed / peak_flops
                log(metrics, result.steps)
            last_step = result.steps == total_steps
            if result.steps % settings.eval_every == 0 or last_step:
                run_eval()
            if result.steps % settings.checkpoint_every == 0 or last_step:
                checkpoint()
            if last_step:
                break
    bar.close()
    return result
