"""Weights I/O: parity with Hugging Face GPT-2, our own round trip, and clear failures."""

import json
import pickle

import pytest
import torch

from gpt_core.config import ModelConfig
from gpt_core.errors import GptflowError
from gpt_core.model import GPTModel
from gpt_core.weights import load_model, model_kind, read_config, save_model

transformers = pytest.importorskip("transformers")

HF_SHAPE = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 50257}


def save_hf_model(folder, **overrides):
    """A randomly initialised transformers GPT-2, written as Hugging Face writes checkpoints."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SHAPE, **overrides)).eval()
    hf.save_pretrained(folder)
    return hf


@pytest.fixture
def no_pickle(monkeypatch):
    """Fail the test if anything unpickles while it runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_folder_gives_hf_logits(tmp_path, no_pickle, tied):
    hf = save_hf_model(tmp_path, tie_word_embeddings=tied)
    model, _ = load_model(tmp_path)
    assert model.cfg.tie_weights is tied
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        actual = model.eval()(idx)
    assert (actual - expected).abs().max() < 1e-4


def test_own_format_round_trip_is_exact(tmp_path, no_pickle):
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=2))
    save_model(model, tmp_path, extra={"labels": ["ham", "spam"]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, config = load_model(tmp_path)
    assert loaded.cfg == model.cfg and config["labels"] == ["ham", "spam"]
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_tied_model_stores_head_once(tmp_path):
    model = GPTModel(ModelConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=1,
                                 tie_weights=True))
    save_model(model, tmp_path)
    loaded, _ = load_model(tmp_path)
    assert loaded.out_head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.out_head.weight, model.out_head.weight)


def test_hf_folder_with_wrong_shapes_names_the_tensor(tmp_path):
    save_hf_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_positions": 64}))
    with pytest.raises(GptflowError, match=r"pos_emb\.weight has shape \(128, 64\), expected \(64, 64\)"):
        load_model(tmp_path)


def test_own_folder_with_wrong_shapes_names_the_tensor(tmp_path):
    save_model(GPTModel(ModelConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=2, n_layers=1)),
               tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model"]["vocab_size"] = 200
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(GptflowError, match=r"out_head\.weight has shape \(300, 32\), expected \(200, 32\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("spec, message", [
    ("gpt2-huge", "no model at 'gpt2-huge'"),
    ("gpt-nano", "without published weights"),
])
def test_unknown_or_weightless_preset_fails(spec, message):
    with pytest.raises(GptflowError, match=message):
        load_model(spec)


@pytest.mark.parametrize("head, extra, kind", [
    (None, {"recipe": "pretrain"}, "language-model"),
    (2, {"recipe": "classifier", "labels": ["not spam", "spam"]}, "classifier"),
    (None, {"recipe": "instruct", "style": "phi3"}, "instruct"),
])
def test_a_model_folder_says_what_kind_of_model_it_holds(tmp_path, head, extra, kind):
    cfg = ModelConfig(vocab_size=64, context_length=16, emb_dim=8, n_heads=2, n_layers=1, num_classes=head)
    save_model(GPTModel(cfg), tmp_path, extra)
    assert model_kind(read_config(tmp_path)) == kind
    assert model_kind({"model_type": "gpt2", "n_positions": 1024}) == "language-model"  # a Hugging Face folder
