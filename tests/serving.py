"""Tiny models to serve in tests, and a real `gptflow serve` process to serve them."""

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import torch
from servers import free_port, wait_until_healthy
from torch import nn

from gpt_core.config import get_preset
from gpt_core.model import GPTModel
from gpt_core.tokenizer import END_OF_TEXT_ID
from gpt_core.weights import save_model

ROOT = Path(__file__).resolve().parents[1]


def save_tiny_instruct_model(folder: Path, seed: int = 0, style: str = "alpaca") -> Path:
    """A random gpt-nano (1024-token context) saved as an instruction model in `style`."""
    torch.manual_seed(seed)
    return save_model(GPTModel(get_preset("gpt-nano", context_length=1024)), folder, extra={"style": style})


def save_answering_model(folder: Path, answer_token: int, style: str = "alpaca") -> Path:
    """A model whose greedy answer to any prompt is `answer_token`, then end-of-text.

    Every block writes nothing into the residual stream, so the last position's hidden state is
    its token's embedding: one direction for every token but `answer_token`, another (orthogonal)
    for it. The output head maps the first to `answer_token` and the second to end-of-text.
    """
    model = GPTModel(get_preset("gpt-nano", context_length=256, tie_weights=False))
    dim = model.cfg.emb_dim
    anything = torch.tensor([1.0, -1.0] * (dim // 2))
    answered = torch.tensor([1.0, 1.0, -1.0, -1.0] * (dim // 4))
    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
        model.tok_emb.weight[:] = anything
        model.tok_emb.weight[answer_token] = answered
        model.out_head.weight[answer_token] = 10 * anything
        model.out_head.weight[END_OF_TEXT_ID] = 10 * answered
    return save_model(model, folder, extra={"style": style})


@contextlib.contextmanager
def gptflow_servers(*servers: tuple[Path, Path, tuple[str, ...]]):
    """`gptflow serve` subprocesses, one per (model, log, options), started together on free
    ports; yields their base URLs once every one answers."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = []
    try:
        for model, log, options in servers:
            port = free_port()
            with open(log, "w") as out:
                process = subprocess.Popen(
                    [sys.executable, "-m", "flows.cli", "serve", "--model", str(model), "--port", str(port),
                     "--threads", "1", *options], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
            started.append((process, f"http://127.0.0.1:{port}", log))
        for process, url, log in started:
            wait_until_healthy(f"{url}/api/version", process, log)
        yield [url for _, url, _ in started]
    finally:
        for process, _, _ in started:
            process.terminate()
        for process, _, _ in started:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextlib.contextmanager
def gptflow_serve(model: Path, log: Path, *options: str):
    """One `gptflow serve` subprocess; yields its base URL once it answers."""
    with gptflow_servers((model, log, options)) as (url,):
        yield url


def status(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/gptflow/status", timeout=10) as reply:
        return json.load(reply)
