"""gpt_core.shards: streamed, threaded tokenization that equals encoding the whole text."""

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt_core import shards
from gpt_core.errors import GptflowError
from gpt_core.shards import read_shard, tokenize_corpora
from gpt_core.tokenizer import stock_tokenizer

MIRROR = Path(os.environ.get("GPTFLOW_MIRROR") or Path(__file__).resolve().parents[2] / "shared/data/mirror")
VERDICT = MIRROR / "the-verdict.txt"
SHAKESPEARE = MIRROR / "tinyshakespeare/input.txt"
pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no mirror folder at {MIRROR}; set GPTFLOW_MIRROR")


@pytest.fixture(scope="module", autouse=True)
def mirror_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTFLOW_MIRROR", str(MIRROR))
        yield


@pytest.fixture(scope="module")
def tokenizer(mirror_env):
    # The reference: tiktoken's own encoding, not the stage's faster-splitting one.
    return stock_tokenizer()


def tokenize(paths, out, **kwargs):
    kwargs = {"shard_tokens": 100_000, "val_fraction": 0.1, "workers": 2, "progress": False, **kwargs}
    return tokenize_corpora(paths, out, **kwargs)


def stream(summary, split):
    return np.concatenate([read_shard(s["path"]) for s in summary[split]["shards"]])


def both(summary):
    return np.concatenate([stream(summary, "train"), stream(summary, "val")])


def test_the_verdict_is_the_books_5145_tokens(tmp_path, tokenizer):
    summary = tokenize([VERDICT], tmp_path)
    expected = tokenizer.encode_ordinary(VERDICT.read_text(encoding="utf-8"))
    assert len(expected) == 5145
    assert both(summary).tolist() == expected
    assert summary["train"]["tokens"] + summary["val"]["tokens"] == 5145
    assert 0.85 < summary["train"]["tokens"] / 5145 < 0.95
    assert summary["sources"][0]["tokens"] == 5145
    assert summary["tokenizer"] == "gpt2"


def test_tinyshakespeare_in_small_pieces_is_exact(tmp_path, tokenizer, monkeypatch):
    # Tiny pieces and blocks put thousands of cuts in the text and carry text across blocks; two
    # encoder processes take them out of order.
    monkeypatch.setattr(shards, "_PIECE_BYTES", 2000)
    monkeypatch.setattr(shards, "_BLOCK_BYTES", 50_000)
    monkeypatch.setattr(shards, "_WORKER_BYTES", 1000)
    summary = tokenize([SHAKESPEARE], tmp_path)
    expected = tokenizer.encode_ordinary(SHAKESPEARE.read_text(encoding="utf-8"))
    assert both(summary).tolist() == expected
    assert 0.88 < summary["train"]["tokens"] / len(expected) < 0.92


def test_cutting_after_a_newline_would_not_be_exact(tokenizer):
    # Why pieces end before whitespace, not after "\n" (see the module docstring).
    text = "a\n\nB"
    assert tokenizer.encode_ordinary(text[:3]) + tokenizer.encode_ordinary(text[3:]) != tokenizer.encode_ordinary(text)


def test_small_shards(tmp_path):
    summary = tokenize([VERDICT], tmp_path, shard_tokens=1000)
    assert [s["tokens"] for s in summary["train"]["shards"]][:-1] == [1000] * (len(summary["train"]["shards"]) - 1)
    assert len(summary["train"]["shards"]) == 5 and len(summary["val"]["shards"]) == 1
    for split in ("train", "val"):
        for i, shard in enumerate(summary[split]["shards"]):
            assert Path(shard["path"]) == tmp_path / f"{split}-{i:05d}.parquet"
            table = pq.read_table(shard["path"])
            assert table.schema == pa.schema([("token", pa.uint16())])
            assert table.num_rows == shard["tokens"] <= 1000
            assert read_shard(shard["path"]).dtype == np.uint16
    assert sorted(os.listdir(tmp_path)) == sorted(Path(s["path"]).name for split in ("train", "val")
                                                  for s in summary[split]["shards"])


def test_rerun_replaces_old_shards(tmp_path):
    tokenize([VERDICT], tmp_path, shard_tokens=500)
    summary = tokenize([VERDICT], tmp_path, shard_tokens=5000)
    assert sorted(os.listdir(tmp_path)) == ["train-00000.parquet", "val-00000.parquet"]
    assert len(both(summary)) == 5145


def test_corpora_are_separated_by_one_end_of_text(tmp_path, tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("First document. " * 50)
    b.write_text("Second document! " * 50)
    summary = tokenize([a, b], tmp_path / "out", val_fraction=0.2)
    for split in ("train", "val"):
        tokens = stream(summary, split).tolist()
        assert tokens.count(50256) == 1
        first, second = tokens[:tokens.index(50256)], tokens[tokens.index(50256) + 1:]
        assert "First" in tokenizer.decode(first) and "Second" not in tokenizer.decode(first)
        assert "Second" in tokenizer.decode(second) and "First" not in tokenizer.decode(second)
    assert [s["tokens"] for s in summary["sources"]] == [len(tokenizer.encode_ordinary(p.read_text())) for p in (a, b)]


def test_invalid_utf8_names_the_byte_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_PIECE_BYTES", 100)
    monkeypatch.setattr(shards, "_BLOCK_BYTES", 1000)
    monkeypatch.setattr(shards, "_WORKER_BYTES", 1000)  # the error is raised in an encoder process
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 500 + b"caf\xe9 " + b"more text " * 50)
    out = tmp_path / "out"
    with pytest.raises(GptflowError, match=r"bad\.txt is not valid UTF-8: byte 0xe9 at byte offset 5003"):
        tokenize([bad], out, shard_tokens=100)
    assert os.listdir(out) == []


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(GptflowError, match=r"corpus .*empty\.txt is empty"):
        tokenize([VERDICT, empty], tmp_path / "out")
    assert not any((tmp_path / "out").glob("*"))


def test_missing_corpus(tmp_path):
    with pytest.raises(GptflowError, match=r"corpus .*nope\.txt does not exist"):
        tokenize([tmp_path / "nope.txt"], tmp_path / "out")


def test_text_without_a_cut_after_the_split_point(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("hello world")  # the only safe cut is before " world", at 45%
    with pytest.raises(GptflowError, match="too small to split off a validation part"):
        tokenize([short], tmp_path / "out")


def test_read_shard_rejects_other_parquet(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"token": pa.array([1, 2], pa.int64())}), path)
    with pytest.raises(GptflowError, match="not a token shard: expected one uint16 column 'token', found token: int64"):
        read_shard(path)


def test_many_segments_run_in_any_order_give_the_same_stream(tmp_path, tokenizer):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:60_000])
    b.write_text(VERDICT.read_text(encoding="utf-8"))
    whole = tokenize([a, b], tmp_path / "whole", shard_tokens=3000)
    backwards = tokenize([a, b], tmp_path / "split", shard_tokens=3000, segment_bytes=7000,
                         run_segments=lambda segments: [shards.tokenize_segment(s, tmp_path / "split", 3000, 1)
                                                        for s in reversed(segments)])
    assert whole["segments"] == 4 and backwards["segments"] > 10
    for split in ("train", "val"):
        assert stream(backwards, split).tolist() == stream(whole, split).tolist()
        names = [Path(s["path"]).name for s in backwards[split]["shards"]]
        assert names == [f"{split}-{i:05d}.parquet" for i in range(len(names))]
    assert backwards["sources"] == whole["sources"]
    assert sorted(os.listdir(tmp_path / "split")) == sorted(Path(s["path"]).name for split in ("train", "val")
                                                            for s in backwards[split]["shards"])


def test_a_failing_segment_removes_the_other_segments_shards(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text " * 5000 + b"caf\xe9 " + b"more text " * 500)
    out = tmp_path / "out"
    with pytest.raises(GptflowError, match=r"byte 0xe9 at byte offset 50003"):
        tokenize([bad], out, shard_tokens=100, segment_bytes=4000)
    assert os.listdir(out) == []


def test_encoders_are_processes_where_fork_exists(monkeypatch):
    # tiktoken's buffer encoder holds the GIL: threads would encode one at a time.
    with shards._encoders(2) as pool:
        assert isinstance(pool, ProcessPoolExecutor) == ("fork" in multiprocessing.get_all_start_methods())
        assert pool.submit(shards._encode, Path("x"), 0, b"Hello world").result().tolist() == [15496, 995]
    with shards._encoders(1) as inline:
        assert inline.submit(shards._encode, Path("x"), 0, b"Hello").result().tolist() == [15496]
