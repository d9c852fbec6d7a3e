"""The GPU check script runs end to end with its tiny plan on the CPU, so it is ready for a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


def test_the_gpu_check_runs_its_tiny_plan_on_the_cpu(tmp_path, mirror):
    report_file = tmp_path / "report.json"
    env = clean_env(GPTFLOW_MIRROR=str(mirror), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
                    TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken"))
    done = subprocess.run([sys.executable, "-m", "flows.bench.gpu_check", "--tiny", "--out", str(report_file)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(report_file.read_text())
    training = report["training"]
    assert training["tokens_per_s"] > 0 and training["compile_seconds"] > 0
    assert 0 < training["mfu_vs_measured_matmul_peak"] < 2
    assert training["mfu_vs_data_sheet_peak"] is None  # a CPU has no data-sheet entry
    assert set(report["decoding"]) == {"weights", *(f"batch{b}_{m}_tokens_per_s" for b in (1, 8)
                                                    for m in ("eager", "compiled"))}
    assert all(v > 0 for k, v in report["decoding"].items() if k != "weights")
    book = report["book_pretraining"]
    assert book["steps"] == 2 and 0 < book["final_val_loss"] < 20


def test_the_full_plan_without_a_gpu_says_so_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.bench.gpu_check"], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("or with --tiny to check the script on this one")
