"""Exports checked by their real consumers: transformers and peft."""

import json

import pytest
import torch

from gpt_core.classifier import SpamDataset, add_classification_head, classify_logits
from gpt_core.config import get_preset
from gpt_core.errors import GptflowError
from gpt_core.export import export_hf, export_model, export_peft_adapters
from gpt_core.generate import generate
from gpt_core.lora import LoRAEmbedding, LoRALinear, inject_lora, save_adapters
from gpt_core.model import GPTModel
from gpt_core.tokenizer import encode, get_tokenizer
from gpt_core.weights import load_model, save_model

PROMPT = [464, 3290, 318]  # "The dog is"
MIXED_TEXT = ("Hello, world! It's 2024 -- they're here.\n\n"
              "def f(x):\n\treturn x ** 2  # square\n    \n"
              "Ünïcödé: naïve café, 東京, Привет, emoji 🚀🙂, NBSP\u00a0here, ideographic\u3000space\n"
              "<|endoftext|>trailing   spaces   ")


def varied_model(**overrides) -> GPTModel:
    """A random gpt-nano whose greedy tokens vary: strong positional embeddings keep a tied head
    from repeating the last token."""
    torch.manual_seed(0)
    model = GPTModel(get_preset("gpt-nano", **overrides)).eval()
    with torch.no_grad():
        model.pos_emb.weight.normal_(std=5 * model.tok_emb.weight.std().item())
    return model


def classifier_model(labels=("ham", "spam")) -> GPTModel:
    model = varied_model()
    torch.manual_seed(1)
    add_classification_head(model, len(labels))
    with torch.no_grad():
        model.out_head.bias.normal_(std=1.0)  # a bias HF's head cannot hold: it must be folded
    return model.eval()


def randomize_lora(model, std=0.2):
    torch.manual_seed(2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear | LoRAEmbedding):
                module.lora_B.normal_(std=std)


def token_batch(batch=2, n=12):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


# --- Hugging Face --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False}, {"qkv_bias": False}],
                         ids=["tied", "untied", "no-qkv-bias"])
def test_transformers_computes_our_logits_and_greedy_tokens(tmp_path, transformers, overrides):
    model = varied_model(**overrides)
    export_hf(model, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] == model.cfg.tie_weights
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == model.cfg.tie_weights
    if not model.cfg.tie_weights:
        assert torch.equal(hf.lm_head.weight, model.out_head.weight)
    x = token_batch()
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4
        theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=30, do_sample=False,
                             pad_token_id=50256)[0, len(PROMPT):].tolist()
    ours = generate(model, [PROMPT], 30)[0]
    assert len(ours) == 30 and len(set(ours)) > 10
    assert theirs == ours


def test_our_loader_reads_the_export_back(tmp_path):
    """hf_to_state, which imports GPT-2 checkpoints, undoes the export exactly."""
    model = varied_model(tie_weights=False)
    export_hf(model, None, tmp_path)
    again, _ = load_model(tmp_path)
    x = token_batch()
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))


def test_autotokenizer_encodes_like_ours(tmp_path, transformers):
    export_hf(varied_model(), None, tmp_path)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= {p.name for p in tmp_path.iterdir()}
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = encode(get_tokenizer(), MIXED_TEXT)
    assert 50256 in ours
    assert hf_tokenizer.encode(MIXED_TEXT) == ours
    assert hf_tokenizer.decode(ours) == MIXED_TEXT


def test_spam_classifier_becomes_gpt2_for_sequence_classification(tmp_path, transformers):
    model = classifier_model()
    export_hf(model, {"labels": ["ham", "spam"], "max_length": 16}, tmp_path)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert hf.config.num_labels == 2 and hf.config.id2label == {0: "ham", 1: "spam"}
    texts = ["Free entry! Win a prize now", "see you at lunch", "Call 0800 now to claim <|endoftext|>"]
    data = SpamDataset(texts, [1, 0, 1], get_tokenizer(), max_length=16)
    ids = torch.stack([data[i][0] for i in range(len(data))])
    assert (ids == 50256).any(), "the batch must hold padding, which HF would otherwise skip"
    # The exported tokenizer truncates and pads as SpamDataset does.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    hf_ids = hf_tokenizer(texts, padding="max_length", truncation=True, split_special_tokens=True)["input_ids"]
    assert hf_ids == ids.tolist()
    with torch.no_grad():
        ours = classify_logits(model, ids)
        theirs = hf(input_ids=ids).logits  # no attention_mask: ours lets padding be attended to
    assert (theirs - ours).abs().max().item() <= 1e-4
    assert torch.allclose(theirs.softmax(-1), ours.softmax(-1), atol=1e-5)


def test_a_head_bias_that_cannot_be_folded_is_a_user_error(tmp_path):
    model = classifier_model()
    with torch.no_grad():
        model.out_head.weight[1] = model.out_head.weight[0]
        model.out_head.bias.copy_(torch.tensor([0.0, 1.0]))
    with pytest.raises(GptflowError, match="no bias"):
        export_hf(model, None, tmp_path)


def test_unmerged_lora_is_refused_by_the_full_model_exports(tmp_path):
    model = varied_model()
    inject_lora(model, rank=2, alpha=4)
    with pytest.raises(GptflowError, match="merge them first"):
        export_hf(model, None, tmp_path / "hf")


# --- PEFT ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("targets, embedding_rank, expected", [
    ("all", 2, ["c_attn", "c_fc", "c_proj", "lm_head", "wte"]),
    ("attention", None, ["attn.c_proj", "c_attn"]),
], ids=["all+embedding", "attention"])
def test_peft_loads_our_lm_adapters(tmp_path, transformers, peft, targets, embedding_rank, expected):
    model = varied_model()
    export_hf(model, None, tmp_path / "base")
    inject_lora(model, rank=4, alpha=8, targets=targets, embedding_rank=embedding_rank)
    randomize_lora(model)
    export_peft_adapters(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == expected and config["fan_in_fan_out"] is True
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == ({"wte": 2} if embedding_rank else {})

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    hf = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = token_batch()
    with torch.no_grad():
        ours = model.eval()(x)
        assert (hf(input_ids=x).logits - ours).abs().max().item() <= 1e-4
        # The adapters matter: without them the logits differ.
        with hf.disable_adapter():
            assert (hf(input_ids=x).logits - ours).abs().max().item() > 1e-2


def test_peft_loads_a_lora_classifier_exported_from_its_folders(tmp_path, transformers, peft):
    """The lora stage's outputs: a base model folder and an adapter folder with a trained head."""
    base = varied_model()
    save_model(base, tmp_path / "pretrained")
    model = classifier_model()
    inject_lora(model, rank=4, alpha=8, embedding_rank=2)
    randomize_lora(model)
    info = {"labels": ["ham", "spam"], "max_length": 16, "stage": "lora"}
    save_adapters(model, tmp_path / "adapters", info)

    out = export_model(tmp_path / "pretrained", "hf", tmp_path / "export", adapters=tmp_path / "adapters")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score", "ln_f"]
    assert "score" not in config["target_modules"]
    hf = peft.AutoPeftModelForSequenceClassification.from_pretrained(out / "adapter").eval()
    ids = torch.stack([row for row, _ in SpamDataset(["win cash now", "hi mum"], [1, 0], get_tokenizer(),
                                                     max_length=16)])
    with torch.no_grad():
        ours = classify_logits(model.eval(), ids)
        assert (hf(input_ids=ids).logits - ours).abs().max().item() <= 1e-4


def test_adapters_folder_without_a_base_is_a_user_error(tmp_path):
    model = varied_model()
    inject_lora(model, rank=2, alpha=4)
    save_adapters(model, tmp_path / "adapters")
    with pytest.raises(GptflowError, match="base model"):
        export_peft_adapters(tmp_path / "adapters", tmp_path / "out")


# --- export_model --------------------------------------------------------------------------------

def export_model_folder(tmp_path, fmt, **kwargs):
    save_model(varied_model(), tmp_path / "model", {"stage": "pretrain"})
    return export_model(tmp_path / "model", fmt, tmp_path / fmt, **kwargs)


def test_export_model_writes_each_format(tmp_path):
    assert (export_model_folder(tmp_path, "hf") / "config.json").is_file()
    # A spam stage's folder: its labels and padded length go with the classifier.
    save_model(classifier_model(), tmp_path / "spam", {"num_classes": 2, "labels": ["ham", "spam"],
                                                      "max_length": 16})
    spam = export_model(tmp_path / "spam", "hf", tmp_path / "spam_hf")
    config = json.loads((spam / "config.json").read_text())
    assert config["id2label"] == {"0": "ham", "1": "spam"} and config["pad_token_id"] == -1
    assert json.loads((spam / "tokenizer_config.json").read_text())["model_max_length"] == 16


@pytest.mark.parametrize("call, message", [
    (lambda p: export_model(p / "model", "onnx", p / "x"), "unknown export format"),
    (lambda p: export_model(p / "model", "hf", p / "x", dtype="f16"), "own precision"),
    (lambda p: export_model(p / "nowhere", "hf", p / "x"), "no model at"),
    (lambda p: export_model(p / "model", "hf", p / "model"), "not an empty folder"),
])
def test_export_model_input_errors_are_one_line(tmp_path, call, message):
    save_model(varied_model(), tmp_path / "model")
    save_model(classifier_model(), tmp_path / "spam", {"num_classes": 2, "labels": ["ham", "spam"]})
    with pytest.raises(GptflowError, match=message) as err:
        call(tmp_path)
    assert "\n" not in str(err.value)
