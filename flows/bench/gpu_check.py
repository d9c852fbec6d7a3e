"""The GPU check: `python -m flows.bench.gpu_check [--tiny] [--out report.json]`, about 8 minutes on one H200.

1. Training: gpt2-small, bf16 autocast, torch.compile, 8 x 1024 tokens a step: tokens/s and MFU
   against the card's dense bf16 peak (its data sheet) and against the matmul peak measured here;
   compile time apart.
2. Decoding: 200 new tokens after a 16-token prompt, bf16 weights, batch 1 and 8, eager and
   compiled (static cache): tokens/s (every row counted).
3. The book profile's pretraining stage end to end (download and tokenize from GPTFLOW_MIRROR,
   then chapter 5's run), with its wall time and final losses.

`--tiny` runs the same code with a model and run small enough for a CPU: the test suite runs it,
so the script is known to work before a GPU machine is at hand. CI never needs a GPU.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpt_core.compiled import compile_seconds
from gpt_core.config import get_preset
from gpt_core.generate import generate
from gpt_core.model import GPTModel
from gpt_core.precision import autocast, measure_peak_flops, resolve_precision

# Dense bf16 tensor-core peaks from the data sheets, FLOP/s (no sparsity).
DENSE_BF16_PEAK = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

FULL = {"preset": "gpt2-small", "context": 1024, "batch": 8, "train_steps": 20, "new_tokens": 200,
        "book_overrides": []}
TINY = {"preset": "gpt-nano", "context": 64, "batch": 2, "train_steps": 3, "new_tokens": 8,
        "book_overrides": ["pretrain.model.preset=gpt-nano", "pretrain.model.context_length=64", "pretrain.epochs=1",
                           "pretrain.max_steps=2", "pretrain.eval_every=1", "pretrain.eval_batches=1"]}


def card_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((peak for key, peak in DENSE_BF16_PEAK.items() if key in name), None)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training(plan: dict, device: torch.device, precision: str) -> dict:
    from gpt_core.flops import training_flops_per_token
    torch.manual_seed(0)
    model = GPTModel(get_preset(plan["preset"], context_length=plan["context"], tie_weights=True)).to(device).train()
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    tokens = torch.randint(0, model.cfg.vocab_size, (plan["batch"], plan["context"] + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
        with autocast(device, precision):
            loss = compiled(inputs, targets=targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    before = compile_seconds()
    step()
    synchronize(device)
    compiling = compile_seconds() - before
    started = time.perf_counter()
    for _ in range(plan["train_steps"]):
        loss = step()
    synchronize(device)
    seconds = (time.perf_counter() - started) / plan["train_steps"]
    rate = plan["batch"] * plan["context"] / seconds
    flops = training_flops_per_token(model, plan["context"]) * rate
    measured = measure_peak_flops(device, precision)
    name, sheet = card_peak(device)
    return {"device_name": name, "precision": precision, "tokens_per_s": round(rate, 1),
            "step_seconds": round(seconds, 4), "compile_seconds": round(compiling, 1),
            "mfu_vs_measured_matmul_peak": round(flops / measured, 3),
            "measured_matmul_peak_tflops": round(measured / 1e12, 1),
            "mfu_vs_data_sheet_peak": round(flops / sheet, 3) if sheet else None,
            "data_sheet_peak_tflops": sheet and round(sheet / 1e12, 1), "final_loss": round(loss.item(), 4)}


def decoding(plan: dict, device: torch.device, precision: str) -> dict:
    torch.manual_seed(0)
    model = GPTModel(get_preset(plan["preset"], context_length=plan["context"], tie_weights=True)).to(device).eval()
    weights = copy.deepcopy(model).to(torch.bfloat16) if precision == "bf16" else model
    results = {}
    for batch in (1, 8):
        prompts = torch.randint(0, model.cfg.vocab_size, (batch, 16)).tolist()
        for compiled in (False, True):
            generate(weights, prompts, 4, stop_id=None, compiled=compiled)  # warm up (and compile)
            synchronize(device)
            started = time.perf_counter()
            generate(weights, prompts, plan["new_tokens"], stop_id=None, compiled=compiled)
            synchronize(device)
            rate = batch * plan["new_tokens"] / (time.perf_counter() - started)
            results[f"batch{batch}_{'compiled' if compiled else 'eager'}_tokens_per_s"] = round(rate, 1)
    return {"weights": "bf16" if precision == "bf16" else "fp32", **results}


def book_pretraining(plan: dict) -> dict:
    """The book profile's download -> tokenize -> pretrain, into a scratch data folder and database."""
    from flows import registry
    from flows.settings import load_profile
    from flows.stage import run_stage
    with tempfile.TemporaryDirectory(prefix="gptflow-gpu-check-") as scratch:
        scratch = Path(scratch)
        tracking = scratch / "mlflow.yaml"
        tracking.write_text(f"tracking_uri: sqlite:///{scratch / 'mlflow.db'}\nexperiment: gpu-check\n"
                            f"artifact_location: {scratch / 'mlruns'}\n")
        profile = load_profile("book", [f"data_dir={scratch / 'data'}", f"mlflow_config={tracking}",
                                        *plan["book_overrides"]])
        started = time.perf_counter()
        produced = {}
        for stage in registry.STAGES:  # up to pretrain, each fed what its upstream produced
            needs = stage.upstream_for(profile.section(stage.name))
            produced[stage.name] = run_stage(stage.name, profile, {u: produced[u] for u in needs})
            if stage.name == "pretrain":
                break
        metrics = produced["pretrain"]["metrics"]
        return {"wall_seconds": round(time.perf_counter() - started, 1), "steps": metrics["steps"],
                "final_train_loss": round(metrics["final/train_loss"], 4),
                "final_val_loss": round(metrics["final/val_loss"], 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a model and run small enough for a CPU")
    parser.add_argument("--out", type=Path, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    plan = TINY if args.tiny else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no GPU visible: run it on a GPU machine, or with --tiny to check the script on this one")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "gptflow-gpu-check-inductor"))
    precision = resolve_precision(device, "auto")
    report = {"plan": "tiny" if args.tiny else "full", "torch": torch.__version__,
              "training": training(plan, device, precision), "decoding": decoding(plan, device, precision),
              "book_pretraining": book_pretraining(plan)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
