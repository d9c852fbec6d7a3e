"""Crash-safe training checkpoints: weights, optimizer, scheduler, RNG and data position.

Each checkpoint is a folder `step-NNNNNNN/` written completely before the `LATEST` pointer is
atomically switched to it, so a process killed mid-write (SIGKILL included) leaves the previous
checkpoint intact and in charge. Everything is safetensors or JSON; nothing is pickled.
"""

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import GptflowError
from .files import atomic_write_bytes, atomic_write_json
from .weights import load_state, model_state, save_tensors

POINTER = "LATEST"

log = logging.getLogger("gptflow")


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"], "indices": sorted(state["state"])}


def _restore_optimizer(optimizer, tensors: dict, layout: dict):
    state = {index: {} for index in layout["indices"]}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state[int(index)][name] = value
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})


class CheckpointStore:
    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder = Path(folder)
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.folder / POINTER
        if not pointer.is_file():
            return None
        path = self.folder / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def save(self, step: int, model, optimizer, scheduler, state: dict, rng: dict[str, torch.Tensor]) -> Path:
        """Write a checkpoint; `rng` holds the generator states to restore (every rank's, in a group)."""
        target = self.folder / f"step-{step:07d}"
        if target.exists():
            shutil.rmtree(target)
        tensors, layout = _optimizer_tensors(optimizer)
        save_tensors(model_state(model), target / "model.safetensors")
        save_tensors(tensors, target / "optimizer.safetensors")
        save_tensors(rng, target / "rng.safetensors")
        atomic_write_json(target / "state.json", {
            **state, "optimizer": layout, "scheduler": scheduler.state_dict()})
        atomic_write_bytes(self.folder / POINTER, (target.name + "\n").encode())
        self._prune(target)
        return target

    def _prune(self, current: Path):
        older = sorted(p for p in self.folder.glob("step-*") if p != current)
        for path in older[:max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, model, optimizer, scheduler) -> tuple[dict, dict[str, torch.Tensor]]:
        """Restore weights, optimizer and scheduler from the latest readable checkpoint; returns its
        saved state and the generator states, for the caller to restore.

        A latest checkpoint that cannot be read (a disk error, a file damaged after it was written)
        is passed over, with a warning, for the one before it.
        """
        latest = self.latest()
        if latest is None:
            raise GptflowError(f"no checkpoint in {self.folder}")
        older = sorted((p for p in self.folder.glob("step-*") if p != latest and (p / "state.json").is_file()),
                       reverse=True)
        problems = []
        for path in (latest, *older):
            try:
                return self._load_one(path, model, optimizer, scheduler)
            except (OSError, ValueError, KeyError, SafetensorError, GptflowError) as err:
                problems.append(f"{path.name}: {err}")
                log.warning("checkpoint %s is unreadable (%s); trying the one before it", path, err)
        raise GptflowError(f"no readable checkpoint in {self.folder} ({'; '.join(problems)}); "
                           "delete the folder to start over")

    @staticmethod
    def _load_one(path: Path, model, optimizer, scheduler) -> tuple[dict, dict[str, torch.Tensor]]:
        state = json.loads((path / "state.json").read_text())
        load_state(model, load_file(path / "model.safetensors"), str(path))
        _restore_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state.pop("optimizer"))
        scheduler.load_state_dict(state.pop("scheduler"))
        return state, load_file(path / "rng.safetensors")
