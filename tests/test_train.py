"""The training loop: exact resume after SIGKILL, crash-safe checkpoints, NaN stop, schedule."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import gpt_core.checkpoint as checkpoint_module
from gpt_core.batches import ShardWindows
from gpt_core.checkpoint import CheckpointStore
from gpt_core.config import get_preset
from gpt_core.errors import GptflowError
from gpt_core.model import GPTModel
from gpt_core.train import TrainSettings, lr_factor, train

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_job


def run_job(shard_dir, checkpoints, out, delay=0.0, **popen):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    return subprocess.Popen([sys.executable, str(HERE / "train_job.py"), str(shard_dir), str(checkpoints),
                             str(out), str(delay)], env=env, **popen)


def test_sigkill_then_resume_equals_uninterrupted_run(shard_dir, tmp_path):
    assert run_job(shard_dir, tmp_path / "straight", tmp_path / "straight-model").wait(120) == 0

    job = run_job(shard_dir, tmp_path / "killed", tmp_path / "killed-model", delay=0.3)
    store = CheckpointStore(tmp_path / "killed")
    deadline = time.time() + 120
    while (store.latest() is None or store.latest().name < "step-0000005") and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    killed_at = store.latest().name
    assert "step-0000005" <= killed_at < "step-0000012"
    assert not (tmp_path / "killed-model").exists()

    assert run_job(shard_dir, tmp_path / "killed", tmp_path / "killed-model").wait(120) == 0
    straight = load_file(tmp_path / "straight-model" / "model.safetensors")
    resumed = load_file(tmp_path / "killed-model" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name

    # The resumed run's history continues the interrupted one: one record per evaluation.
    import json
    history = json.loads((CheckpointStore(tmp_path / "killed").latest() / "state.json").read_text())["history"]
    assert [h["step"] for h in history] == [0, 4, 8, 12]


def test_torn_checkpoint_write_keeps_previous_checkpoint(shard_dir, tmp_path, monkeypatch):
    train_data, val_data = train_job.data(shard_dir)
    model = GPTModel(get_preset("gpt-nano", context_length=32))
    settings = TrainSettings(max_steps=3, checkpoint_every=1, eval_every=100, eval_batches=1, precision="fp32")
    real_save = checkpoint_module.save_tensors
    calls = {"n": 0}

    def crash_on_third_checkpoint(tensors, path, metadata=None):
        if path.parent.name == "step-0000003" and path.name == "optimizer.safetensors":
            path.write_bytes(b"torn")  # half a file, then the process "dies"
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(checkpoint_module, "save_tensors", crash_on_third_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train(model, settings, train_data, val_data, tmp_path, progress=False)
    store = CheckpointStore(tmp_path)
    assert store.latest().name == "step-0000002"

    monkeypatch.setattr(checkpoint_module, "save_tensors", real_save)
    resumed = GPTModel(get_preset("gpt-nano", context_length=32))
    result = train(resumed, settings, train_data, val_data, tmp_path, progress=False)
    assert result.resumed_from == 2 and result.steps == 3
    assert store.latest().name == "step-0000003"


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(shard_dir, tmp_path):
    train_data, val_data = train_job.data(shard_dir)
    model = GPTModel(get_preset("gpt-nano", context_length=32))
    calls = {"n": 0}

    def loss_fn(model, inputs, targets):
        calls["n"] += model.training
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss * math.nan if calls["n"] == 3 else loss

    settings = TrainSettings(max_steps=10, checkpoint_every=1, eval_every=100, eval_batches=1, precision="fp32")
    with pytest.raises(GptflowError, match="step 3") as err:
        train(model, settings, train_data, val_data, tmp_path, loss_fn=loss_fn, progress=False)
    assert "step-0000002" in str(err.value)
    assert CheckpointStore(tmp_path).latest().name == "step-0000002"


def test_resume_with_other_settings_is_refused(shard_dir, tmp_path):
    train_data, val_data = train_job.data(shard_dir)
    model = GPTModel(get_preset("gpt-nano", context_length=32))
    train(model, TrainSettings(max_steps=1, eval_batches=1, precision="fp32"), train_data, None, tmp_path,
          progress=False)
    with pytest.raises(GptflowError, match="other training settings"):
        train(model, TrainSettings(max_steps=2, lr=1.0, eval_batches=1, precision="fp32"), train_data, None, tmp_path,
              progress=False)


def test_frozen_parameters_stay_put_and_only_trainable_ones_move(shard_dir, tmp_path):
    train_data, _ = train_job.data(shard_dir)
    model = GPTModel(get_preset("gpt-nano", context_length=32))
    for p in model.parameters():
        p.requires_grad = False
    model.final_norm.weight.requires_grad = True
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, TrainSettings(max_steps=2, eval_batches=1, precision="fp32", lr=1e-2), train_data, None, tmp_path,
          progress=False)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name != "final_norm.weight"), name


def test_lr_schedule_warms_up_then_decays_to_min():
    factors = [lr_factor(s, total=100, warmup=10, min_ratio=0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_windows_are_the_books_and_deterministic(shard_dir):
    shards = [{"path": str(shard_dir / "val-00000.parquet"), "tokens": pq.read_metadata(shard_dir / "val-00000.parquet").num_rows}]
    tokens = pq.read_table(shards[0]["path"]).column(0).to_numpy().astype(np.int64)
    source = ShardWindows(shards, 32, 16, 1000, shuffle=False, drop_last=False)
    inputs, targets = next(source.batches())
    starts = range(0, len(tokens) - 32, 16)
    assert inputs.shape == (len(starts), 32)
    assert torch.equal(inputs[1], torch.from_numpy(tokens[16:48]))
    assert torch.equal(targets[1], torch.from_numpy(tokens[17:49]))

    shuffled = ShardWindows(shards, 32, 16, 4, shuffle=True, drop_last=True, seed=3)
    epoch = list(shuffled.batches(1))
    assert [torch.equal(a[0], b[0]) for a, b in zip(epoch, shuffled.batches(1))] == [True] * len(epoch)
    skipped = list(shuffled.batches(1, skip=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epoch[2:], skipped))


def test_corpus_shorter_than_one_window_is_refused(shard_dir):
    shards = [{"path": str(shard_dir / "val-00000.parquet"), "tokens": 20}]
    with pytest.raises(GptflowError, match="not enough for one window"):
        ShardWindows(shards, 32, 32, 2, shuffle=False, drop_last=False, split="validation")


def test_missing_shard_is_refused(tmp_path):
    with pytest.raises(GptflowError, match="missing"):
        ShardWindows([{"path": str(tmp_path / "train-00000.parquet"), "tokens": 100}], 32, 32, 2,
                     shuffle=False, drop_last=False)


def test_flops_count_only_the_work_autograd_does():
    from gpt_core.classifier import add_classification_head, set_trainable
    from gpt_core.flops import training_flops_per_token
    from gpt_core.lora import LoraSettings, inject_lora

    cfg = get_preset("gpt-nano", context_length=32)
    model = GPTModel(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 12 * cfg.n_layers * 32 * cfg.emb_dim
    # Everything trains: PaLM's 6N + 12·L·T·d over the matmul weights.
    assert training_flops_per_token(model, 32) == 6 * linear + attention

    add_classification_head(model, 2)
    set_trainable(model, "head")
    head = model.out_head.weight.numel()
    # Only the head trains: the forward everywhere, and the head's weight gradient.
    forward = 2 * (linear - cfg.vocab_size * cfg.emb_dim + head) + attention / 3
    assert training_flops_per_token(model, 32) == forward + 2 * head

    lora = GPTModel(cfg)
    inject_lora(lora, LoraSettings(rank=2, alpha=4))
    low_rank = training_flops_per_token(lora, 32)
    # Input gradients flow everywhere (every layer has an adapter), weight gradients only into LoRA.
    assert 4 * linear + attention < low_rank < 6 * linear + attention
