"""Shared by the benchmarks: twin models with one set of weights, fair timing, reporting."""

import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from gpt_core.config import get_preset
from gpt_core.model import GPTModel
from gpt_core.precision import bf16_supported
from gpt_core.weights import hf_to_state, load_state

# transformers' fastest attention on CPU: "eager" materialises the score matrix, and
# flash-attention kernels are CUDA-only.
HF_ATTENTION = "sdpa"


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def twin_models(context_length: int, seed: int = 0):
    """Our GPT-2 small and transformers' GPT2LMHeadModel holding identical weights.

    Our head is tied to the token embedding as GPT-2's is, so both have 124M parameters and
    do the same work; dropout is off in both.
    """
    import transformers
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = get_preset("gpt2-small", context_length=context_length, tie_weights=True)
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=context_length, n_embd=cfg.emb_dim, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=HF_ATTENTION)
    hf = transformers.GPT2LMHeadModel(hf_config)
    ours = GPTModel(cfg)
    load_state(ours, hf_to_state(hf.state_dict(), cfg), "transformers GPT-2")
    return ours, hf


def precisions() -> list[str]:
    return ["fp32", "bf16"] if bf16_supported("cpu") else ["fp32"]


def interleaved_medians(runs: dict[str, Callable], repeats: int, warmup: int = 1):
    """Median seconds of each run and each run's last result.

    The runs take turns, in an order that flips every round, so that a change in machine
    speed (other load, clocks) reaches all of them alike.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    results = {}
    order = list(runs)
    for _ in range(repeats):
        for name in order:
            start = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
        order.reverse()
    return {name: statistics.median(seconds) for name, seconds in times.items()}, results


def environment() -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads(), "cpu_bf16": bf16_supported("cpu")}


def emit(result: dict, as_json: bool, lines: list[str]):
    print(json.dumps(result, indent=2) if as_json else "\n".join(lines))
