"""OpenAI presets through huggingface_hub: the shared cache, HF_ENDPOINT, offline mode, hash checks.

A loopback stand-in for the hub serves a GPT-2 checkpoint that transformers wrote, as
`openai-community/gpt2`; the real huggingface_hub client downloads it.
"""

import os
import subprocess
import sys

import pytest
import torch

from gpt_core.errors import GptflowError
from gpt_core.weights import load_model
from tests.hub_server import HubServer
from tests.test_weights import save_hf_model

REPO = "openai-community/gpt2"


@pytest.fixture
def hub_root(tmp_path):
    save_hf_model(tmp_path / "hub" / REPO)
    return tmp_path / "hub"


@pytest.fixture
def hub(hub_root, tmp_path, monkeypatch):
    """The stand-in hub running, with huggingface_hub pointed at it and at an empty cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("GPTFLOW_MIRROR", str(tmp_path / "empty-mirror"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with HubServer(hub_root) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        yield server


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([[464, 3290, 318]])).float()


def test_preset_downloads_once_into_the_hf_cache_and_matches_transformers(hub, hub_root, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = load_model("gpt2-small")
    reference = transformers.GPT2LMHeadModel.from_pretrained(hub_root / REPO).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([[464, 3290, 318]])).logits
    torch.testing.assert_close(logits(model), expected, atol=1e-4, rtol=1e-4)
    assert list((tmp_path / "hf-cache").glob("models--openai-community--gpt2/snapshots/*/model.safetensors"))

    load_model("gpt2-small")
    assert hub.downloads == {f"{REPO}/config.json": 1, f"{REPO}/model.safetensors": 1}


def test_offline_mode_uses_the_cache_and_says_what_to_do_without_it(hub, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GptflowError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set") as err:
        load_model("gpt2-small")
    assert "\n" not in str(err.value) and REPO in str(err.value)
    assert not hub.downloads

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    online, _ = load_model("gpt2-small")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline, _ = load_model("gpt2-small")
    torch.testing.assert_close(logits(offline), logits(online))
    assert hub.downloads[f"{REPO}/model.safetensors"] == 1


def cached_weights(tmp_path):
    (link,) = (tmp_path / "hf-cache").glob("models--openai-community--gpt2/snapshots/*/model.safetensors")
    return link.resolve()


def test_a_corrupt_cached_file_is_fetched_again_never_loaded(hub, tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    good, _ = load_model("gpt2-small")
    blob = cached_weights(tmp_path)
    data = bytearray(blob.read_bytes())
    data[-8:] = b"\0" * 8
    blob.write_bytes(bytes(data))

    reloaded, _ = load_model("gpt2-small")
    torch.testing.assert_close(logits(reloaded), logits(good))
    assert hub.downloads[f"{REPO}/model.safetensors"] == 2
    assert "does not match its hash; fetching it again" in caplog.text

    blob = cached_weights(tmp_path)
    blob.write_bytes(blob.read_bytes()[:-1])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(GptflowError, match="does not match its hash and was removed; unset HF_HUB_OFFLINE"):
        load_model("gpt2-small")
    assert not blob.exists()


def test_bytes_that_do_not_match_the_hubs_hash_are_refused(hub):
    hub.corrupt(f"{REPO}/model.safetensors")
    with pytest.raises(GptflowError, match="does not match the hash the hub gives for it"):
        load_model("gpt2-small")


def test_an_unreachable_hub_is_one_line(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(GptflowError) as err:
        load_model("gpt2-small")
    assert "\n" not in str(err.value) and "http://127.0.0.1:9" in str(err.value)


def test_the_mirror_wins_over_the_hub(hub, hub_root, monkeypatch):
    monkeypatch.setenv("GPTFLOW_MIRROR", str(hub_root))
    load_model("gpt2-small")
    assert not hub.downloads


def test_the_cli_follows_hf_endpoint_hf_home_and_hf_hub_offline(hub_root, tmp_path):
    """The environment variables as a user sets them, read by a fresh `gptflow` process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MLFLOW_"))}
    # The team's mirror holds the tokenizer's files but no GPT-2 weights: those come from the hub.
    env.update(HF_HOME=str(tmp_path / "hf-home"), GPTFLOW_HOME=str(tmp_path / "work"))
    command = [sys.executable, "-m", "flows.cli", "generate", "--model", "gpt2-small", "--max-new-tokens", "3",
               "--seed", "1", "The sky"]
    with HubServer(hub_root) as server:
        online = subprocess.run(command, env={**env, "HF_ENDPOINT": server.url}, capture_output=True,
                                text=True, timeout=300)
        assert online.returncode == 0, online.stderr
    assert server.downloads[f"{REPO}/model.safetensors"] == 1
    assert list((tmp_path / "hf-home" / "hub").glob("models--openai-community--gpt2/snapshots/*/config.json"))

    offline = subprocess.run(command, env={**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": server.url},
                             capture_output=True, text=True, timeout=300)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online.stdout
