"""Pretraining corpora -> Parquet token shards, and reading them back.

Shard format (the training data loader reads it): Parquet files with exactly one column, `token`,
of type uint16, one row per token, named `train-00000.parquet`, `train-00001.parquet`, ... and
`val-00000.parquet`, ...; each holds at most `shard_tokens` tokens. A split's token stream is its
shards concatenated in name order; each corpus file is one document, and documents are separated
by one <|endoftext|> (50256).

Corpora are streamed in blocks and encoded in pieces on several threads, yet the tokens are
exactly `encode_ordinary(whole_text)`: pieces are cut only where GPT-2's pre-tokenizer splits
anyway. Its pattern is

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

and no pre-token holds a non-whitespace character followed by whitespace, so the place between the
two is always a boundary; the pre-token before it ends in non-whitespace, so the (?!\\S) lookahead
never looks across it either. Cutting after a newline is not safe: "a\\n\\nB" encodes as a,\\n,\\n,B
but "a\\n\\n" + "B" as a,\\n\\n,B. Both characters are checked as ASCII bytes, so a cut never splits
a UTF-8 sequence.
"""

from __future__ import annotations

import os
import re
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .errors import GptflowError
from .files import atomic_output, sha256_file
from .tokenizer import END_OF_TEXT_ID, get_tokenizer

SPLITS = ("train", "val")
COLUMN = "token"
_SAFE_CUT = re.compile(rb"[\x21-\x7e](?=[\t\n\x0b\x0c\r ])")  # match end = a safe cut
_PIECE_BYTES = 256 << 10  # one thread's unit of work
_BLOCK_BYTES = 4 << 20  # read size
_IN_FLIGHT = 2  # pieces queued per thread: keeps threads busy while the main thread writes shards


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of one shard as a uint16 array."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise GptflowError(f"cannot read token shard {path}: {err}") from None
    if table.schema.names != [COLUMN] or table.schema.field(COLUMN).type != pa.uint16():
        found = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
        raise GptflowError(f"{path} is not a token shard: expected one uint16 column '{COLUMN}', found {found}")
    return table.column(COLUMN).to_numpy()


def tokenize_corpora(paths: list[Path], out_dir: Path, *, shard_tokens: int, val_fraction: float, threads: int,
                     progress: bool = True) -> dict:
    """Encode each corpus with GPT-2's BPE into train/val shards under `out_dir`; returns a summary.

    The first `1 - val_fraction` of each corpus (by bytes, up to the next safe cut) goes to train,
    the rest to val. `threads=0` means one per CPU. Shards already in `out_dir` are replaced.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise GptflowError("no corpora to tokenize")
    if shard_tokens < 1 or not 0 < val_fraction < 1 or threads < 0:
        raise GptflowError(f"need shard_tokens >= 1, 0 < val_fraction < 1 and threads >= 0; "
                           f"got {shard_tokens}, {val_fraction}, {threads}")
    for path in paths:
        if not path.is_file():
            raise GptflowError(f"corpus {path} does not exist or is not a file")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = get_tokenizer()
    writers = {split: _ShardWriter(out_dir, split, shard_tokens) for split in SPLITS}
    threads = threads or os.cpu_count() or 1
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool, \
                tqdm(total=sum(p.stat().st_size for p in paths), desc="tokenize", unit="B", unit_scale=True,
                     leave=False, disable=None if progress else True) as bar:
            def encode(text: str) -> np.ndarray:
                # Like encode_ordinary (no special tokens: disallowed_special=() reads "<|endoftext|>" in
                # the text as plain text), but into a buffer: no Python int per token, and the GIL stays free.
                return tokenizer.encode_to_numpy(text, disallowed_special=()).astype(np.uint16)

            submit = partial(pool.submit, encode)
            sources = [_tokenize_file(path, val_fraction, writers, submit, _IN_FLIGHT * threads, bar)
                       for path in paths]
        for writer in writers.values():
            writer.close()
        if not writers["val"].tokens:
            raise GptflowError(f"the corpora are too small to split off a validation part "
                               f"(val_fraction={val_fraction}); add text or raise val_fraction")
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    seconds = time.perf_counter() - started
    keep = {Path(s["path"]).name for w in writers.values() for s in w.shards}
    for stale in out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9].parquet"):
        if stale.name.split("-")[0] in SPLITS and stale.name not in keep:
            stale.unlink()
    total = sum(w.tokens for w in writers.values())
    return {
        "tokenizer": "gpt2",
        "dir": str(out_dir),
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        **{split: {"tokens": w.tokens, "shards": w.shards} for split, w in writers.items()},
        "sources": sources,
        "seconds": round(seconds, 3),
        "tokens_per_sec": round(total / seconds, 1),
    }


def _tokenize_file(path: Path, val_fraction: float, writers: dict, submit, in_flight: int, bar) -> dict:
    size = path.stat().st_size
    counts = dict.fromkeys(SPLITS, 0)
    queue: deque[tuple[int, str, Future]] = deque()  # pieces being encoded, in file order

    def write_oldest():
        piece_bytes, split, future = queue.popleft()
        tokens = future.result()
        if not counts[split]:
            writers[split].start_document()
        writers[split].add(tokens)
        counts[split] += len(tokens)
        bar.update(piece_bytes)

    with path.open("rb") as f:
        for offset, piece, split in _pieces(f, int(size * (1 - val_fraction))):
            queue.append((len(piece), split, submit(_decode(path, offset, piece))))
            if len(queue) > in_flight:
                write_oldest()
    while queue:
        write_oldest()
    if not counts["train"] + counts["val"]:
        raise GptflowError(f"corpus {path} is empty: nothing to tokenize")
    return {"path": str(path.resolve()), "bytes": size, "sha256": sha256_file(path),
            "tokens": counts["train"] + counts["val"], "train_tokens": counts["train"], "val_tokens": counts["val"]}


def _pieces(f: BinaryIO, split_at: int) -> Iterator[tuple[int, bytes, str]]:
    """(file offset, bytes, split) pieces of `f`, each ending at a safe cut or at the end of the file.

    The first safe cut at or after byte `split_at` ends the train part. A stretch without any safe
    cut (e.g. text without ASCII spaces) stays in one piece, however long.
    """
    buf, base = b"", 0  # base: the file offset of buf[0]
    while block := f.read(_BLOCK_BYTES):
        buf += block
        start = 0
        while True:
            target = start + _PIECE_BYTES
            if base + start < split_at:
                target = min(target, split_at - base)
            cut = _SAFE_CUT.search(buf, target - 1)  # its end is the first safe cut >= target
            if cut is None:
                break
            yield base + start, buf[start:cut.end()], "val" if base + start >= split_at else "train"
            start = cut.end()
        buf, base = buf[start:], base + start
    if buf:
        yield base, buf, "val" if base >= split_at else "train"


def _decode(path: Path, offset: int, piece: bytes) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptflowError(f"corpus {path} is not valid UTF-8: byte 0x{piece[err.start]:02x} at byte offset "
                           f"{offset + err.start} ({err.reason})") from None


class _ShardWriter:
    """One split's token stream, written out a shard at a time so memory is bounded by the shard size."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.tokens = 0
        self.shards: list[dict] = []

    def start_document(self):
        if self.tokens:
            self.add(np.array([END_OF_TEXT_ID], dtype=np.uint16))

    def add(self, tokens: np.ndarray):
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        self.tokens += len(tokens)
        if self.pending_tokens >= self.shard_tokens:
            flat = np.concatenate(self.pending)
            full = len(flat) - len(flat) % self.shard_tokens
            for i in range(0, full, self.shard_tokens):
                self._write(flat[i:i + self.shard_tokens])
            self.pending = [flat[full:]]
            self.pending_tokens = len(flat) - full

    def close(self):
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
            self.pending, self.pending_tokens = [], 0

    def discard(self):
        for shard in self.shards:
            Path(shard["path"]).unlink(missing_ok=True)

    def _write(self, tokens: np.ndarray):
        path = self.out_dir / f"{self.split}-{len(self.shards):05d}.parquet"
        with atomic_output(path) as tmp:
            pq.write_table(pa.table({COLUMN: pa.array(tokens, type=pa.uint16())}), tmp)
        self.shards.append({"path": str(path), "tokens": len(tokens), "sha256": sha256_file(path)})
