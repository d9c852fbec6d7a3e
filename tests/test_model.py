"""GPTModel: shapes, causality, GPT-2's parameter counts and dropout."""

import pytest
import torch
import torch.nn.functional as F

from gpt_core import model as model_module
from gpt_core.config import ModelConfig, get_preset
from gpt_core.model import GPTModel, blocked_causal_attention

TINY = ModelConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)


def test_logits_and_hidden_shapes():
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (3, 11))
    assert model(idx).shape == (3, 11, TINY.vocab_size)
    assert model(idx, return_hidden=True).shape == (3, 11, TINY.emb_dim)


def test_later_tokens_do_not_change_earlier_logits():
    torch.manual_seed(0)
    model = GPTModel(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY.vocab_size
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


@pytest.mark.parametrize("overrides, expected", [
    ({"tie_weights": True}, 124_439_808),  # what Hugging Face reports for GPT-2 small
    # The book's GPT_CONFIG_124M: its own output head and no query/key/value bias.
    ({"tie_weights": False, "qkv_bias": False}, 163_009_536),
])
def test_gpt2_small_parameter_count(overrides, expected):
    with torch.device("meta"):  # counts shapes without allocating 124M floats
        model = GPTModel(get_preset("gpt2-small", **overrides))
    assert model.num_parameters() == expected


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(**{**TINY.to_dict(), "drop_rate": 0.5}))
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(idx), model(idx))
        model.eval()
        assert torch.equal(model(idx), model(idx))


def test_init_schemes_gpt2_and_the_books_pytorch_defaults():
    from gpt_core.errors import GptflowError
    cfg = get_preset("gpt-nano", tie_weights=False)
    gpt2 = GPTModel(cfg, init="gpt2")
    book = GPTModel(cfg, init="pytorch")
    assert gpt2.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert book.tok_emb.weight.std().item() == pytest.approx(1.0, rel=0.05)
    with pytest.raises(GptflowError, match="unknown init"):
        GPTModel(cfg, init="xavier")


def attention_inputs(seed=0, shape=(1, 2, 70, 8)):  # 70 tokens: two blocks of 64 queries, one partial
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(3)]


def test_blocked_attention_without_dropout_is_sdpa():
    queries, keys, values = attention_inputs()
    torch.testing.assert_close(blocked_causal_attention(queries, keys, values, 0.0),
                               F.scaled_dot_product_attention(queries, keys, values, is_causal=True))


def test_blocked_dropout_is_statistically_sdpas_dropout():
    """Over many draws both have the dropout-free output as their mean and the same variance."""
    queries, keys, values = attention_inputs(1)
    expected = F.scaled_dot_product_attention(queries, keys, values, is_causal=True)
    torch.manual_seed(0)
    draws = 2000
    ours = torch.stack([blocked_causal_attention(queries, keys, values, 0.1) for _ in range(draws)])
    sdpa = torch.stack([F.scaled_dot_product_attention(queries, keys, values, is_causal=True, dropout_p=0.1)
                        for _ in range(draws)])
    # The first query sees one key: dropping it zeroes the output, so its mean is exact only on average.
    for sample in (ours, sdpa):
        error = (sample.mean(0) - expected).abs() / (sample.std(0) / draws ** 0.5 + 1e-6)
        assert error.mean() < 1.2  # a standard error's mean |z| is 0.8
    ratio = ours.var(0).mean() / sdpa.var(0).mean()
    assert 0.95 < ratio < 1.05
    per_element = (ours.var(0) + 1e-6) / (sdpa.var(0) + 1e-6)
    assert per_element.median().item() == pytest.approx(1.0, abs=0.05)


def test_training_on_the_cpu_with_dropout_takes_the_blocked_path(monkeypatch):
    calls = []
    real = model_module.blocked_causal_attention
    monkeypatch.setattr(model_module, "blocked_causal_attention", lambda *a: calls.append(1) or real(*a))
    model = GPTModel(ModelConfig(**{**TINY.__dict__, "drop_rate": 0.1}))
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    model.train()(idx).sum().backward()
    assert len(calls) == TINY.n_layers
    model.eval()(idx)
    assert len(calls) == TINY.n_layers  # evaluation has no dropout: SDPA's fused kernel
