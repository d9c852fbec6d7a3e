"""Pretraining corpora -> Parquet token shards, and reading them back.

Shard format (the training data loader reads it): Parquet files with exactly one column, `token`,
of type uint16, one row per token, named `train-00000.parquet`, `train-00001.parquet`, ... and
`val-00000.parquet`, ...; each holds at most `shard_tokens` tokens. A split's token stream is its
shards concatenated in name order; each corpus file is one document, and documents are separated
by one <|endoftext|> (50256).

Corpora are planned as segments (byte ranges, by default a few hundred MB), each tokenized into
shards of its own, on this machine one after another or as tasks spread over a cluster (the
tokenize stage's Dask task runner); within a segment the text is streamed in blocks and encoded
in pieces by several worker processes. Yet the tokens are exactly `encode_ordinary(whole_text)`:
segments and pieces are cut only where GPT-2's pre-tokenizer splits anyway. Its pattern is

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

and no pre-token holds a non-whitespace character followed by whitespace, so the place between the
two is always a boundary; the pre-token before it ends in non-whitespace, so the (?!\\S) lookahead
never looks across it either. Cutting after a newline is not safe: "a\\n\\nB" encodes as a,\\n,\\n,B
but "a\\n\\n" + "B" as a,\\n\\n,B. Both characters are checked as ASCII bytes, so a cut never splits
a UTF-8 sequence.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import GptflowError
from .files import atomic_output, sha256_file
from .progress import Progress
from .tokenizer import END_OF_TEXT_ID, get_tokenizer

SPLITS = ("train", "val")
COLUMN = "token"
SEGMENT_BYTES = 256 << 20  # one tokenize task's share of a corpus
_SAFE_CUT = re.compile(rb"[\x21-\x7e](?=[\t\n\x0b\x0c\r ])")  # match end = a safe cut
_PIECE_BYTES = 256 << 10  # one worker's unit of work
_BLOCK_BYTES = 4 << 20  # read size
_IN_FLIGHT = 2  # pieces queued per worker: keeps workers busy while this process writes shards
_WORKER_BYTES = 2 << 20  # less text than this per worker does not pay for starting the worker
_SEGMENT_SHARDS = "*-seg[0-9][0-9][0-9][0-9][0-9]-[0-9][0-9][0-9][0-9][0-9].parquet"


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of one corpus, all in one split; both ends are safe cuts or the file's ends."""

    index: int  # position in the plan: the order of the split's token stream
    path: str
    start: int
    end: int
    split: str
    new_document: bool  # an earlier corpus put tokens in this split: begin with <|endoftext|>


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


def plan_segments(paths: Sequence[Path], val_fraction: float, segment_bytes: int = SEGMENT_BYTES) -> list[Segment]:
    """Cut the corpora into segments of about `segment_bytes`.

    The first `1 - val_fraction` of each corpus (by bytes, up to the next safe cut) goes to
    train, the rest to val. A stretch without any safe cut (text without ASCII spaces) stays in
    one segment, however long.
    """
    segments: list[Segment] = []
    has_tokens = dict.fromkeys(SPLITS, False)
    for path in map(Path, paths):
        if not path.is_file():
            raise GptflowError(f"corpus {path} does not exist or is not a file")
        size = path.stat().st_size
        if size == 0:
            raise GptflowError(f"corpus {path} is empty: nothing to tokenize")
        with path.open("rb") as f:
            split_at = _next_cut(f, int(size * (1 - val_fraction)), size)
            for split, begin, end in (("train", 0, split_at), ("val", split_at, size)):
                start = begin
                while start < end:
                    stop = min(end, _next_cut(f, start + segment_bytes, size))
                    segments.append(Segment(len(segments), str(path.resolve()), start, stop, split,
                                            new_document=start == begin and has_tokens[split]))
                    start = stop
                has_tokens[split] = has_tokens[split] or end > begin
    return segments


def _next_cut(f: BinaryIO, offset: int, size: int, window: int = 1 << 16) -> int:
    """The first safe cut at or after byte `offset`, or `size` when there is none."""
    position = max(0, offset - 1)
    while position < size - 1:
        f.seek(position)
        buf = f.read(window + 1)
        cut = _SAFE_CUT.search(buf)
        if cut is not None:
            return position + cut.end()
        position += window  # windows overlap by a byte: a pair across the edge is seen
    return size


def _encode(path: Path, offset: int, piece: bytes) -> np.ndarray:
    # Like encode_ordinary (no special tokens: disallowed_special=() reads "<|endoftext|>" in the
    # text as plain text), but into a buffer, with no Python int per token.
    return get_tokenizer().encode_to_numpy(_decode(path, offset, piece), disallowed_special=()).astype(np.uint16)


class _Inline:
    """One worker: encode in this process, without a pool's hand-offs."""

    def submit(self, fn, *args) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            future.set_exception(err)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _encoders(workers: int) -> Executor | _Inline:
    """Worker processes where they can fork: tiktoken's buffer encoder holds the GIL, so threads
    would take turns. A daemonic process (a Dask worker) may not have children: threads there."""
    if workers == 1:
        return _Inline()
    get_tokenizer()  # loaded before the fork, so every worker inherits it
    if "fork" in multiprocessing.get_all_start_methods() and not multiprocessing.current_process().daemon:
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
    return ThreadPoolExecutor(workers)


def tokenize_segment(segment: Segment, out_dir: Path, shard_tokens: int, workers: int = 0) -> dict:
    """Encode one segment into shards `<split>-segNNNNN-MMMMM.parquet` under `out_dir`.

    `workers=0` means one per CPU. On an error the segment's shards are removed.
    """
    workers = workers or os.cpu_count() or 1
    with _encoders(workers) as pool:
        return _encode_segment(segment, Path(out_dir), shard_tokens, pool, workers)


def _encode_segment(segment: Segment, out_dir: Path, shard_tokens: int, pool, workers: int,
                    bar: Progress | None = None) -> dict:
    path = Path(segment.path)
    writer = _ShardWriter(out_dir, f"{segment.split}-seg{segment.index:05d}", shard_tokens)
    queue: deque[tuple[int, Future]] = deque()  # pieces being encoded, in file order
    tokens = 0

    def write_oldest():
        nonlocal tokens
        piece_bytes, future = queue.popleft()
        encoded = future.result()
        writer.add(encoded)
        tokens += len(encoded)
        if bar is not None:
            bar.update(piece_bytes)

    try:
        if segment.new_document:
            writer.add(np.array([END_OF_TEXT_ID], dtype=np.uint16))
        with path.open("rb") as f:
            for offset, piece in _pieces(f, segment.start, segment.end):
                queue.append((len(piece), pool.submit(_encode, path, offset, piece)))
                if len(queue) > _IN_FLIGHT * workers:
                    write_oldest()
            while queue:
                write_oldest()
        writer.close()
    except BaseException:
        for _, future in queue:
            future.cancel()
        writer.discard()
        raise
    return {"index": segment.index, "tokens": tokens, "shards": writer.shards}


def tokenize_corpora(paths: list[Path], out_dir: Path, *, shard_tokens: int, val_fraction: float, workers: int,
                     segment_bytes: int = SEGMENT_BYTES, progress: bool = True,
                     run_segments: Callable[[list[Segment]], list[dict]] | None = None) -> dict:
    """Encode each corpus with GPT-2's BPE into train/val shards under `out_dir`; returns a summary.

    Segments run one after another here, on `workers` encoder processes (0: one per CPU), unless
    `run_segments` runs them (it must call `tokenize_segment` on each and return the results).
    Shards already in `out_dir` are replaced.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise GptflowError("no corpora to tokenize")
    if shard_tokens < 1 or not 0 < val_fraction < 1 or workers < 0 or segment_bytes < 1:
        raise GptflowError(f"need shard_tokens >= 1, 0 < val_fraction < 1, workers >= 0 and segment_bytes >= 1; "
                           f"got {shard_tokens}, {val_fraction}, {workers}, {segment_bytes}")
    segments = plan_segments(paths, val_fraction, segment_bytes)
    if not any(s.split == "val" for s in segments):
        raise GptflowError(f"the corpora are too small to split off a validation part "
                           f"(val_fraction={val_fraction}); add text or raise val_fraction")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        if run_segments is None:
            total = sum(s.end - s.start for s in segments)
            workers = max(1, min(workers or os.cpu_count() or 1, total // _WORKER_BYTES))
            with _encoders(workers) as pool, \
                    Progress(total, "tokenize", "B", unit_scale=True, enabled=progress) as bar:
                results = [_encode_segment(s, out_dir, shard_tokens, pool, workers, bar) for s in segments]
        else:
            results = run_segments(segments)
    except BaseException:
        for partial in out_dir.glob(_SEGMENT_SHARDS):
            partial.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - started
    return _number_shards(paths, segments, results, out_dir, shard_tokens, val_fraction, seconds)


def _number_shards(paths, segments, results, out_dir: Path, shard_tokens, val_fraction, seconds) -> dict:
    """Rename the segments' shards to `<split>-NNNNN.parquet` in stream order; the summary."""
    by_index = {r["index"]: r for r in results}
    splits = {split: {"tokens": 0, "shards": []} for split in SPLITS}
    sources = {str(p.resolve()): {"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": sha256_file(p),
                                  "tokens": 0, "train_tokens": 0, "val_tokens": 0} for p in paths}
    for segment in segments:
        result = by_index[segment.index]
        split = splits[segment.split]
        for shard in result["shards"]:
            final = out_dir / f"{segment.split}-{len(split['shards']):05d}.parquet"
            os.replace(shard["path"], final)
            split["shards"].append({**shard, "path": str(final)})
            split["tokens"] += shard["tokens"]
        source = sources[segment.path]
        source["tokens"] += result["tokens"]
        source[f"{segment.split}_tokens"] += result["tokens"]
    keep = {Path(s["path"]).name for split in splits.values() for s in split["shards"]}
    for stale in out_dir.glob("*-[0-9][0-9][0-9][0-9][0-9].parquet"):
        if stale.name.split("-")[0] in SPLITS and stale.name not in keep:
            stale.unlink()
    total = sum(split["tokens"] for split in splits.values())
    return {
        "tokenizer": "gpt2",
        "dir": str(out_dir),
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        **splits,
        "sources": list(sources.values()),
        "segments": len(segments),
        "seconds": round(seconds, 3),
        "tokens_per_sec": round(total / seconds, 1),
    }


def _pieces(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(file offset, bytes) pieces of bytes [start, end) of `f`, each ending at a safe cut or at `end`."""
    f.seek(start)
    buf, base, remaining = b"", start, end - start  # base: the file offset of buf[0]
    while remaining and (block := f.read(min(_BLOCK_BYTES, remaining))):
        remaining -= len(block)
        buf += block
        begin = 0
        while (cut := _SAFE_CUT.search(buf, begin + _PIECE_BYTES - 1)) is not None:
            yield base + begin, buf[begin:cut.end()]
            begin = cut.end()
        buf, base = buf[begin:], base + begin
    if buf:
        yield base, buf


def _decode(path: Path, offset: int, piece: bytes) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as err:
        raise GptflowError(f"corpus {path} is not valid UTF-8: byte 0x{piece[err.start]:02x} at byte offset "
                           f"{offset + err.start} ({err.reason})") from None


class _ShardWriter:
    """A token stream written out a shard at a time, so memory is bounded by the shard size."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []

    def add(self, tokens: np.ndarray):
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
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
        path = self.out_dir / f"{self.prefix}-{len(self.shards):05d}.parquet"
        with atomic_output(path) as tmp:
            pq.write_table(pa.table({COLUMN: pa.array(tokens, type=pa.uint16())}), tmp)
        self.shards.append({"path": str(path), "tokens": len(tokens), "sha256": sha256_file(path)})
