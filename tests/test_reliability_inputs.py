"""Bad input and a hostile machine: each is one line on stderr with exit code 2, never a traceback.

Covers the inputs an adversarial run found crashing or silently accepted, errors raised deep
inside a Prefect flow, a corrupt latest checkpoint (resume falls back to the one before it), and
a full or read-only disk (on a small tmpfs, where this machine lets the test mount one).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt_core.checkpoint import CheckpointStore
from gpt_core.classifier import add_classification_head
from gpt_core.config import get_preset
from gpt_core.errors import user_message
from gpt_core.model import GPTModel
from gpt_core.train import TrainSettings, train
from gpt_core.weights import save_model
from tests import train_job
from tests.test_weights import save_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_hf_model(root / "lm")
    torch.manual_seed(0)
    classifier = GPTModel(get_preset("gpt-nano"))
    add_classification_head(classifier, 2)
    save_model(classifier, root / "classifier", {"labels": ["ham", "spam"]})
    return root


def config_variant(models, tmp_path, change) -> str:
    folder = tmp_path / "variant"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((models / "lm" / "model.safetensors").read_bytes())
    config = json.loads((models / "lm" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(change(config)))
    return str(folder)


CASES = {
    "config.json is a list": (lambda m, t: ["generate", "--model", config_variant(m, t, lambda c: [c]), "hi"],
                              "must be a JSON object, got a list"),
    "config.json holds a number as text": (
        lambda m, t: ["generate", "--model", config_variant(m, t, lambda c: {**c, "n_embd": "64"}), "hi"],
        "emb_dim must be int, got '64'"),
    "nan temperature": (lambda m, t: ["generate", "--model", str(m / "lm"), "--temperature", "nan", "hi"],
                        "temperature must be a finite number"),
    "batch_size=true": (lambda m, t: ["config", "validate", "--config", "smoke", "--set", "pretrain.batch_size=true"],
                        "pretrain.batch_size must be a number, got true"),
    "lr=.inf": (lambda m, t: ["config", "validate", "--config", "smoke", "--set", "pretrain.lr=.inf"],
                "lr must be a finite number, got inf"),
    "empty instruction": (lambda m, t: ["ask", "--model", str(m / "lm"), ""], "the instruction is empty"),
    "classifier to ask": (lambda m, t: ["ask", "--model", str(m / "classifier"), "Say hi"],
                          "is a classifier (2 classes), not a language model"),
    "classifier to generate": (lambda m, t: ["generate", "--model", str(m / "classifier"), "hi"],
                               "is a classifier (2 classes), not a language model"),
    "unbounded max-new-tokens": (
        lambda m, t: ["generate", "--model", str(m / "lm"), "--max-new-tokens", "999999999999", "hi"],
        "--max-new-tokens: must be at most 100000"),
    "unknown command": (lambda m, t: ["frobnicate"], "invalid choice: 'frobnicate'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_with_exit_code_2(case, models, tmp_path, run_cli):
    argv, message = CASES[case]
    code, out, err = run_cli(*argv(models, tmp_path))
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("gptflow") and message in err, err


def test_an_error_deep_in_a_flow_is_one_line_and_verbose_shows_the_traceback(tmp_path):
    """The download stage's flow fails on a mirror without the files: Prefect's tracebacks stay out."""
    (tmp_path / "empty-mirror").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(GPTFLOW_HOME=str(tmp_path / "work"), GPTFLOW_MIRROR=str(tmp_path / "empty-mirror"))
    command = [sys.executable, "-m", "flows.cli", "stage", "download", "--config", "smoke"]
    quiet = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 2, quiet.stderr
    errors = [line for line in quiet.stderr.splitlines() if "rror" in line]
    assert errors == [f"gptflow: error: the-verdict: {tmp_path}/empty-mirror/the-verdict.txt does not exist; "
                      "check that GPTFLOW_MIRROR points at a complete mirror folder"], quiet.stderr
    assert "Traceback" not in quiet.stderr

    verbose = subprocess.run(command + ["--verbose"], env=env, capture_output=True, text=True, timeout=600)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-2].startswith("gptflow: error: the-verdict:")


SETTINGS = TrainSettings(max_steps=3, checkpoint_every=1, eval_every=100, eval_batches=1, precision="fp32")


def test_a_corrupt_latest_checkpoint_resumes_from_the_one_before(shard_dir, tmp_path, caplog):
    train_data, val_data = train_job.data(shard_dir)
    straight = GPTModel(get_preset("gpt-nano", context_length=32))
    train(straight, SETTINGS, train_data, val_data, tmp_path, progress=False)
    store = CheckpointStore(tmp_path)
    latest = store.latest()
    assert latest.name == "step-0000003"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    resumed = GPTModel(get_preset("gpt-nano", context_length=32))
    result = train(resumed, SETTINGS, train_data, val_data, tmp_path, progress=False)
    assert result.resumed_from == 2
    assert "step-0000003 is unreadable" in caplog.text and "trying the one before it" in caplog.text
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert load_file(store.latest() / "model.safetensors")  # the replayed step wrote a good one


def _mount_tmpfs(folder: Path, options: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    folder = _mount_tmpfs(tmp_path / "small", "size=2m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)])


@pytest.fixture
def read_only_disk(tmp_path):
    folder = _mount_tmpfs(tmp_path / "read-only", "ro,size=1m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)])


def test_a_full_disk_during_a_checkpoint_is_one_clear_line(shard_dir, small_disk):
    train_data, val_data = train_job.data(shard_dir)
    model = GPTModel(get_preset("gpt-nano", context_length=32))
    with pytest.raises(OSError) as err:
        train(model, SETTINGS, train_data, val_data, small_disk, progress=False)
    message = user_message(err.value)
    assert message and "\n" not in message and "No space left on device" in message
    assert CheckpointStore(small_disk).latest() is None
    assert not [p for p in small_disk.rglob("*") if p.is_file() and ".part-" in p.name]


def test_a_read_only_data_folder_is_one_line(read_only_disk, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("GPTFLOW_HOME", str(tmp_path))
    code, out, err = run_cli("stage", "download", "--config", "smoke", "--set", f"data_dir={read_only_disk}")
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("gptflow: error: Read-only file system")
    assert "Traceback" not in err


def test_a_prefect_server_that_does_not_start_in_time_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API_URL"))}
    env.update(GPTFLOW_HOME=str(tmp_path), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="0")
    result = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "download", "--config", "smoke"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gptflow: error:")]
    assert len(errors) == 1 and "did not answer within 0 s" in errors[0] and "PREFECT_API_URL" in errors[0]
