import json
import math

import pytest
import torch

from gpt_core.classifier import add_classification_head
from gpt_core.config import get_preset
from gpt_core.errors import GptflowError
from gpt_core.lora import (
    LoRAEmbedding,
    LoRALinear,
    LoraSettings,
    count_parameters,
    inject_lora,
    load_adapters,
    load_lora_state,
    lora_state_dict,
    merge_lora,
    save_adapters,
)
from gpt_core.model import GPTModel
from gpt_core.weights import load_model, save_model


def nano(**overrides):
    torch.manual_seed(0)
    return GPTModel(get_preset("gpt-nano", **overrides)).eval()


def tokens(batch=2, n=10):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(1))


def randomize_b(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear | LoRAEmbedding):
                module.lora_B.normal_(std=0.05)


def test_zero_b_leaves_outputs_unchanged():
    model = nano()
    x = tokens()
    before = model(x)
    assert inject_lora(model, LoraSettings(rank=4, alpha=8)) == 2 * 4 + 1  # 4 linears per block + out_head
    assert torch.equal(model(x), before)


def test_attention_targets_wrap_only_qkv_and_out_proj():
    model = nano()
    assert inject_lora(model, LoraSettings(rank=2, alpha=2, targets="attention")) == 4
    wrapped = sorted(name for name, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["trf_blocks.0.att.out_proj", "trf_blocks.0.att.qkv",
                       "trf_blocks.1.att.out_proj", "trf_blocks.1.att.qkv"]


def test_lora_shapes_and_init_follow_the_book():
    model = nano()
    inject_lora(model, LoraSettings(rank=4, alpha=8))
    qkv = model.trf_blocks[0].att.qkv
    assert qkv.lora_A.shape == (32, 4) and qkv.lora_B.shape == (4, 96)
    assert qkv.scale == 2.0 and qkv.scaling == "standard" and torch.count_nonzero(qkv.lora_B) == 0 and qkv.lora_A.abs().sum() > 0


class BookLoRALayer(torch.nn.Module):
    """The book's appendix E LoRALayer, as printed: alpha * (x @ A @ B)."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(in_dim, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = torch.nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):
        return self.alpha * (x @ self.A @ self.B)


class BookLinearWithLoRA(torch.nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = BookLoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


@pytest.mark.parametrize("scaling, book_alpha", [("book", 16.0), ("standard", 16.0 / 4)])
def test_book_scaling_computes_the_books_lora_layer(scaling, book_alpha):
    """scaling: book is the book's LinearWithLoRA; standard is the book's layer with alpha / rank."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 48)
    book = BookLinearWithLoRA(linear, rank=4, alpha=book_alpha)
    ours = LoRALinear(linear, rank=4, alpha=16.0, scaling=scaling)
    with torch.no_grad():
        book.lora.A.normal_()
        book.lora.B.normal_()
        ours.lora_A.copy_(book.lora.A)
        ours.lora_B.copy_(book.lora.B)
    x = torch.randn(3, 5, 32)
    assert torch.allclose(ours(x), book(x), rtol=1e-6, atol=1e-5)
    merged = linear.weight + ours.delta().T
    assert torch.allclose(x @ merged.T + linear.bias, book(x), rtol=1e-5, atol=1e-4)


def test_scaling_travels_with_saved_adapters(tmp_path):
    model = nano()
    inject_lora(model, LoraSettings(rank=4, alpha=8, scaling="book"))
    randomize_b(model)
    save_adapters(model, tmp_path)
    fresh = nano()
    load_adapters(fresh, tmp_path)
    assert fresh.trf_blocks[0].att.qkv.scale == 8.0
    x = tokens()
    assert torch.equal(fresh(x), model(x))


def test_bad_settings_are_user_errors():
    with pytest.raises(GptflowError, match="targets"):
        inject_lora(nano(), LoraSettings(rank=4, alpha=8, targets="mlp"))
    with pytest.raises(GptflowError, match="rank"):
        inject_lora(nano(), LoraSettings(rank=0, alpha=8))
    model = nano()
    inject_lora(model, LoraSettings(rank=4, alpha=8))
    with pytest.raises(GptflowError, match="already"):
        inject_lora(model, LoraSettings(rank=4, alpha=8))


def test_tied_head_stays_tied():
    model = nano()
    assert model.cfg.tie_weights
    inject_lora(model, LoraSettings(rank=4, alpha=8))
    assert model.out_head.linear.weight is model.tok_emb.weight


def test_merged_equals_unmerged():
    model = nano()
    inject_lora(model, LoraSettings(rank=4, alpha=8))
    randomize_b(model)
    x = tokens()
    unmerged = model(x)
    embedding = model.tok_emb.weight.detach().clone()
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    # The head's update must not leak into the embedding it was tied to.
    assert torch.equal(model.tok_emb.weight, embedding)
    assert not model.cfg.tie_weights


def test_merge_then_save_and_load_model(tmp_path):
    model = nano()
    inject_lora(model, LoraSettings(rank=4, alpha=8))
    randomize_b(model)
    x = tokens()
    expected = model(x)
    save_model(merge_lora(model), tmp_path / "merged")
    loaded, _ = load_model(tmp_path / "merged")
    assert torch.allclose(loaded.eval()(x), expected, atol=1e-5)


def test_only_lora_and_head_params_change_in_a_step():
    model = nano()
    add_classification_head(model)
    inject_lora(model, LoraSettings(rank=4, alpha=8, targets="attention"))
    for param in model.out_head.parameters():
        param.requires_grad = True
    randomize_b(model)  # with B = 0, A gets no gradient in the first step
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # Handing the optimizer every parameter shows that freezing alone keeps the base fixed.
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.train()
    model(tokens())[:, -1, :].sum().backward()
    optimizer.step()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    expected = {name for name in before if ".lora_" in name or name.startswith("out_head.")}
    assert changed == expected


def test_trainable_share():
    model = nano()
    total_before = count_parameters(model)[1]
    inject_lora(model, LoraSettings(rank=4, alpha=8, targets="attention"))
    trainable, total = count_parameters(model)
    lora = 2 * ((32 * 4 + 4 * 96) + (32 * 4 + 4 * 32))
    assert (trainable, total) == (lora, total_before + lora)


def test_state_dict_holds_adapters_and_a_new_head():
    model = nano()
    inject_lora(model, LoraSettings(rank=4, alpha=8))
    assert all(".lora_" in name for name in lora_state_dict(model))
    classifier = add_classification_head(nano())
    inject_lora(classifier, LoraSettings(rank=4, alpha=8))  # the book: the frozen fresh head gets LoRA too
    names = set(lora_state_dict(classifier))
    assert {"out_head.linear.weight", "out_head.linear.bias", "out_head.lora_A"} <= names


def test_save_and_load_adapters_round_trip(tmp_path):
    torch.manual_seed(5)
    model = add_classification_head(nano())
    inject_lora(model, LoraSettings(rank=4, alpha=8))
    randomize_b(model)
    x = tokens()
    expected = model(x)
    save_adapters(model, tmp_path, {"base_model": "gpt-nano (random)"})
    config = json.loads((tmp_path / "adapters.json").read_text())
    assert (config["rank"], config["alpha"], config["targets"], config["model"]["num_classes"]) == (4, 8, "all", 2)
    assert config["base_model"] == "gpt-nano (random)"

    torch.manual_seed(6)  # a different random head: it must come from the adapters
    fresh = add_classification_head(nano())
    load_adapters(fresh, tmp_path)
    assert torch.equal(fresh.eval()(x), expected)


def test_load_rejects_adapters_for_another_shape(tmp_path):
    model = nano()
    inject_lora(model, LoraSettings(rank=4, alpha=8))
    save_adapters(model, tmp_path)
    other = nano()
    inject_lora(other, LoraSettings(rank=2, alpha=8))
    with pytest.raises(GptflowError, match="trained with"):
        load_adapters(other, tmp_path)
    state = lora_state_dict(model)
    state.pop("trf_blocks.0.att.qkv.lora_B")
    with pytest.raises(GptflowError, match="missing trf_blocks.0.att.qkv.lora_B"):
        load_lora_state(model, state)
    with pytest.raises(GptflowError, match="add the classification head first"):
        load_adapters(add_classification_head(nano()), tmp_path)
    with pytest.raises(GptflowError, match="cannot read"):
        load_adapters(nano(), tmp_path / "nowhere")


def test_embedding_adapter_starts_at_zero_and_merges_into_an_untied_embedding(tmp_path):
    model = nano()
    x = tokens()
    before = model(x)
    assert inject_lora(model, LoraSettings(rank=4, alpha=8, embedding_rank=2)) == 2 * 4 + 1 + 1
    assert model.tok_emb.lora_A.shape == (50257, 2) and model.tok_emb.lora_B.shape == (2, 32)
    assert torch.equal(model(x), before)
    trainable, _ = count_parameters(model)
    assert trainable == 2 * (32 * 4 + 4 * 96 + 32 * 4 + 4 * 32 + 32 * 4 + 4 * 128 + 128 * 4 + 4 * 32) \
        + (32 * 4 + 4 * 50257) + (50257 * 2 + 2 * 32)

    randomize_b(model)
    head = model.out_head.linear.weight.detach().clone()
    unmerged = model(x)
    save_model(model, tmp_path / "checkpoint-like")  # a tied, wrapped model saves (train() does this)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear | LoRAEmbedding) for m in model.modules())
    assert torch.allclose(model(x), unmerged, atol=1e-5)
    # The embedding's update must not leak into the output head it was tied to, nor the head's into it.
    assert not model.cfg.tie_weights and model.out_head.weight is not model.tok_emb.weight
    assert not torch.equal(model.out_head.weight, head) and not torch.equal(model.tok_emb.weight, head)


def test_embedding_adapters_save_and_load(tmp_path):
    model = nano()
    inject_lora(model, LoraSettings(rank=4, alpha=8, embedding_rank=2))
    randomize_b(model)
    x = tokens()
    expected = model(x)
    save_adapters(model, tmp_path)
    fresh = nano()
    config = load_adapters(fresh, tmp_path)
    assert config["embedding_rank"] == 2 and isinstance(fresh.tok_emb, LoRAEmbedding)
    assert torch.equal(fresh(x), expected)
