"""`gptflow generate`: the same text as transformers, and one-line errors for bad input."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

MIRROR = Path(os.environ.get("GPTFLOW_MIRROR") or Path(__file__).resolve().parents[2] / "shared/data/mirror")
PROMPT = "Every effort moves you"
pytestmark = pytest.mark.skipif(
    not (MIRROR / "gpt2").is_dir(), reason=f"no GPT-2 BPE files under {MIRROR}; set GPTFLOW_MIRROR")


@pytest.fixture(autouse=True)
def offline_tokenizer(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFLOW_MIRROR", str(MIRROR))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random transformers GPT-2 in Hugging Face's folder format, and the model itself."""
    torch.manual_seed(0)
    # A wider initialisation than GPT-2's keeps a random model from repeating one token.
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=50257,
                                     initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf-gpt2")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.parametrize("options", [[], ["--compile", "true"]], ids=["eager", "compiled"])
def test_greedy_text_matches_transformers(hf_folder, run_cli, options):
    from gpt_core.tokenizer import get_tokenizer
    folder, hf = hf_folder
    tokenizer = get_tokenizer()
    prompt = torch.tensor([tokenizer.encode(PROMPT)])
    new = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                      pad_token_id=50256)[0, prompt.size(1):]
    code, out, err = run_cli("generate", "--model", str(folder), "--temperature", "0",
                             "--max-new-tokens", "20", *options, PROMPT)
    assert code == 0, err
    assert out == PROMPT + tokenizer.decode(new.tolist()) + "\n"


def mismatched_folder(hf_folder, tmp_path):
    """The HF folder with a config.json that promises a shorter context than its weights hold."""
    folder = tmp_path / "mismatched"
    shutil.copytree(hf_folder[0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_positions": 64}))
    return folder


@pytest.mark.parametrize("case, message", [
    ("unknown preset", "no model at 'gpt2-huge'"),
    ("mismatched weights", "pos_emb.weight has shape (128, 64), expected (64, 64)"),
    ("prompt too long", "longer than the model's context of 128"),
    ("top-k 0", "top-k must be at least 1"),
    ("negative temperature", "temperature must be >= 0"),
    ("nan temperature", "temperature must be a finite number"),
])
def test_bad_input_is_one_line_exit_2(hf_folder, tmp_path, run_cli, case, message):
    model, prompt, options = str(hf_folder[0]), PROMPT, []
    if case == "unknown preset":
        model = "gpt2-huge"
    elif case == "mismatched weights":
        model = str(mismatched_folder(hf_folder, tmp_path))
    elif case == "prompt too long":
        prompt = " word" * 200
    elif case == "top-k 0":
        options = ["--temperature", "1", "--top-k", "0"]
    elif case == "nan temperature":
        options = ["--temperature", "nan"]
    else:
        options = ["--temperature", "-1"]
    code, out, err = run_cli("generate", "--model", model, *options, prompt)
    assert code == 2
    assert out == ""
    assert err.startswith("gptflow: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err
