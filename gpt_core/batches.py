"""Deterministic, resumable batch sources for the training loop.

A batch source knows how many batches an epoch has and can start an epoch at any batch, so a
resumed run sees exactly the batches the interrupted one would have seen. Order depends only on
(seed, epoch).
"""

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import torch

from .errors import GptflowError


class BatchSource(Protocol):
    def num_batches(self, epoch: int) -> int: ...
    def batches(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def _order(n: int, shuffle: bool, seed: int, epoch: int, *salt: int) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, *salt]).permutation(n)


class DatasetBatches:
    """Batches of a map-style dataset (spam messages, instruction examples) through `collate`."""

    def __init__(self, dataset: Sequence, batch_size: int, collate: Callable, *, shuffle: bool,
                 drop_last: bool, seed: int = 123):
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed

    def num_batches(self, epoch: int = 0) -> int:
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def batches(self, epoch: int = 0, skip: int = 0):
        order = _order(len(self.dataset), self.shuffle, self.seed, epoch)
        for b in range(skip, self.num_batches(epoch)):
            items = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.collate([self.dataset[int(i)] for i in items])


class ShardWindows:
    """The book's sliding windows (GPTDatasetV1) over Parquet token shards.

    Windows start every `stride` tokens; the target is the input shifted by one. Only one shard
    is in memory at a time: an epoch visits the shards in a seeded order and the windows of each
    shard in a seeded order, so shuffling never needs the whole corpus.
    """

    def __init__(self, shards: Sequence[dict], context_length: int, stride: int, batch_size: int, *,
                 shuffle: bool, drop_last: bool, seed: int = 123, split: str = "train"):
        for shard in shards:
            if not Path(shard["path"]).is_file():
                raise GptflowError(f"{split} shard {shard['path']} is missing; re-run `gptflow stage tokenize --force`")
        self.paths = [Path(s["path"]) for s in shards]
        self.context_length, self.stride, self.batch_size = context_length, stride, batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.windows = [len(range(0, s["tokens"] - context_length, stride)) for s in shards]
        if sum(self.windows) == 0:
            total = sum(s["tokens"] for s in shards)
            raise GptflowError(
                f"the {split} split has {total} tokens, not enough for one window of context_length "
                f"{context_length} plus 1; use a smaller context_length or more text")

    def num_batches(self, epoch: int = 0) -> int:
        full, rest = divmod(sum(self.windows), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def batches(self, epoch: int = 0, skip: int = 0):
        to_skip = skip * self.batch_size
        pending_inputs, pending_targets, produced = [], [], skip
        for shard_index in _order(len(self.paths), self.shuffle, self.seed, epoch):
            n_windows = self.windows[shard_index]
            if to_skip >= n_windows:
                to_skip -= n_windows
                continue
            tokens = torch.from_numpy(
                pq.read_table(self.paths[shard_index], columns=["token"]).column(0).to_numpy().astype(np.int64))
            starts = _order(n_windows, self.shuffle, self.seed, epoch, int(shard_index))[to_skip:] * self.stride
            to_skip = 0
            for start in starts:
                pending_inputs.append(tokens[start:start + self.context_length])
                pending_targets.append(tokens[start + 1:start + self.context_length + 1])
                if len(pending_inputs) == self.batch_size:
                    yield torch.stack(pending_inputs), torch.stack(pending_targets)
                    pending_inputs, pending_targets = [], []
                    produced += 1
        if pending_inputs and not self.drop_last and produced < self.num_batches(epoch):
            yield torch.stack(pending_inputs), torch.stack(pending_targets)


class RankShare:
    """One data-parallel rank's share of a batch source: batches rank, rank + W, rank + 2W, ...

    The W ranks of a group together see exactly the source's batches in the source's order, so
    W processes with micro-batch B train on the same data, step for step, as one process taking
    W batches of B per step. With `even`, every rank gets the same number of batches (what
    training needs, since every step all-reduces); without it the last ranks may get one fewer
    (evaluation, which sums over ranks).
    """

    def __init__(self, source: BatchSource, rank: int, world_size: int, *, even: bool = True):
        self.source, self.rank, self.world_size, self.even = source, rank, world_size, even

    def num_batches(self, epoch: int = 0) -> int:
        total = self.source.num_batches(epoch)
        if self.even:
            return total // self.world_size
        return len(range(self.rank, total, self.world_size))

    def batches(self, epoch: int = 0, skip: int = 0):
        end = self.num_batches(epoch) * self.world_size if self.even else self.source.num_batches(epoch)
        start = skip * self.world_size
        for index, batch in enumerate(self.source.batches(epoch, skip=start), start):
            if index >= end:
                break
            if index % self.world_size == self.rank:
                yield batch
