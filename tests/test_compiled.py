"""torch.compile: when `auto` compiles, compiled training equals eager, compile time reported on
its own, compiled code reused from the cache folder."""

import pytest
import torch

from gpt_core import compiled
from gpt_core.batches import ShardWindows
from gpt_core.config import ModelConfig
from gpt_core.metrics import COMPILE_SECONDS, TOKENS_PER_SEC, TRAIN_LOSS
from gpt_core.model import GPTModel
from gpt_core.train import TrainSettings, train

TINY = ModelConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1, drop_rate=0.0)


def never_measured():
    raise AssertionError("a plainly short run must not measure the peak")


def test_auto_compiles_only_where_the_run_repays_it(monkeypatch):
    monkeypatch.setattr(compiled, "can_compile", lambda device: True)
    assert compiled.should_compile(True, "cpu") and not compiled.should_compile(False, "cpu")
    assert not compiled.should_compile("auto", "cpu", 1e9, never_measured)
    # 1 PFLOP of training at 1 TFLOP/s is ~2000 s eager: worth compiling; at 1 PFLOP/s it is 2 s.
    assert compiled.should_compile("auto", "cpu", 1e15, lambda: 1e12)
    assert not compiled.should_compile("auto", "cpu", 1e15, lambda: 1e15)
    monkeypatch.setattr(compiled, "can_compile", lambda device: False)
    assert not compiled.should_compile("auto", "cpu", 1e18, lambda: 1e9)


def test_auto_compiles_decoding_on_cuda_only(monkeypatch):
    monkeypatch.setattr(compiled, "can_compile", lambda device: True)
    assert compiled.should_compile_decoding(True, "cpu") and not compiled.should_compile_decoding(False, "cuda")
    assert not compiled.should_compile_decoding("auto", "cpu")
    assert compiled.should_compile_decoding("auto", "cuda")
    monkeypatch.setattr(compiled, "can_compile", lambda device: False)
    assert not compiled.should_compile_decoding("auto", "cuda")


class Metrics:
    def __init__(self):
        self.points = []

    def log_metrics(self, metrics, step):
        self.points.append((step, dict(metrics)))

    def log_params(self, params):
        pass

    def log_text(self, text, name):
        pass


def run(shard_dir, folder, compile_setting):
    shards = [{"path": str(p), "tokens": None} for p in sorted(shard_dir.glob("train-*"))]
    import pyarrow.parquet as pq
    for shard in shards:
        shard["tokens"] = pq.read_metadata(shard["path"]).num_rows
    data = ShardWindows(shards, TINY.context_length, TINY.context_length, 4, shuffle=True, drop_last=True)
    settings = TrainSettings(max_steps=3, eval_every=100, checkpoint_every=100, eval_batches=1, lr=1e-3,
                             precision="fp32", compile=compile_setting)
    torch.manual_seed(0)
    logger = Metrics()
    result = train(GPTModel(TINY), settings, data, None, folder, progress=False, peak=1.0, logger=logger)
    return result, [(step, metrics) for step, metrics in logger.points if TRAIN_LOSS in metrics]


def test_compiled_training_equals_eager_reports_compile_time_and_reuses_the_cache(shard_dir, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "inductor"))
    torch._dynamo.reset()
    eager, eager_points = run(shard_dir, tmp_path / "eager", False)
    fast, fast_points = run(shard_dir, tmp_path / "compiled", True)
    assert not eager.compiled and fast.compiled
    losses = [[metrics[TRAIN_LOSS] for _, metrics in points] for points in (eager_points, fast_points)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    # Compiling happened in the first step, and is reported there, apart from its tokens/s.
    first_step, first = fast_points[0]
    assert first_step == 1 and first[COMPILE_SECONDS] == pytest.approx(fast.compile_seconds)
    assert fast.compile_seconds > 0 and all(COMPILE_SECONDS not in m for _, m in fast_points[1:])
    assert all(COMPILE_SECONDS not in m for _, m in eager_points)
    assert first[TOKENS_PER_SEC] > 0
    assert any((tmp_path / "inductor").rglob("*.py")), "inductor wrote its code into the cache folder"

    # A new run of the same model, after forgetting every compiled graph: from the cache folder.
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    again, again_points = run(shard_dir, tmp_path / "again", True)
    assert counters["inductor"]["fxgraph_cache_hit"] > 0
    # Compiled kernels split their reductions over threads their own way: equal to float rounding,
    # not bitwise (eager is; tests/test_train.py).
    assert [m[TRAIN_LOSS] for _, m in again_points] == pytest.approx([m[TRAIN_LOSS] for _, m in fast_points],
                                                                      rel=1e-6)
