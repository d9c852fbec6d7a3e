"""The chunked vocabulary loss equals the plain loss over full logits, in value and gradients."""

import pytest
import torch

from gpt_core import loss as loss_module
from gpt_core.config import ModelConfig
from gpt_core.lora import LoraSettings, inject_lora
from gpt_core.loss import IGNORE_INDEX, logits_loss, vocabulary_loss
from gpt_core.model import GPTModel

TINY = ModelConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2)


def loss_and_grads(fn, hidden, weight, targets, autocast=False):
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = fn(hidden, weight, targets)
    value.backward()
    return value.detach(), hidden.grad, weight.grad


def plain(hidden, weight, targets):
    return logits_loss(hidden @ weight.t(), targets)


@pytest.fixture(params=[(5, 40), (1024, 8192)], ids=["chunks cross rows and vocabulary blocks", "one chunk"])
def chunk_rows(request, monkeypatch):
    rows, vocab_block = request.param
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", rows)
    monkeypatch.setattr(loss_module, "VOCAB_BLOCK", vocab_block)


def batch(seed=0, rows=(3, 17), emb=32, vocab=97):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows, emb, generator=generator)
    weight = torch.randn(vocab, emb, generator=generator) * 0.2
    targets = torch.randint(0, vocab, rows, generator=generator)
    targets[0, :4] = IGNORE_INDEX  # masked prompt tokens and padding do not count
    targets[2, -3:] = IGNORE_INDEX
    return hidden, weight, targets


def test_chunked_loss_equals_the_plain_loss_in_value_and_gradients(chunk_rows):
    hidden, weight, targets = batch()
    expected = loss_and_grads(plain, hidden, weight, targets)
    got = loss_and_grads(vocabulary_loss, hidden, weight, targets)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_chunked_loss_under_bf16_autocast_matches_the_plain_autocast_loss(chunk_rows):
    hidden, weight, targets = batch(1)
    expected = loss_and_grads(plain, hidden, weight, targets, autocast=True)
    got = loss_and_grads(vocabulary_loss, hidden, weight, targets, autocast=True)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=0)
    # Both round the logits' gradient to bf16 before the matmuls and the head's gradient after them
    # (ours once per chunk): equal to bf16's precision, as a whole.
    for a, b in zip(got[1:], expected[1:]):
        assert (a - b).norm() / b.norm() < 1e-2


def test_without_gradients_the_chunked_loss_is_the_plain_value(chunk_rows):
    hidden, weight, targets = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(vocabulary_loss(hidden, weight, targets), plain(hidden, weight, targets),
                                   rtol=1e-6, atol=0)


def test_every_target_ignored_gives_zero_not_nan():
    hidden, weight, targets = batch(3)
    value, grad_hidden, _ = loss_and_grads(vocabulary_loss, hidden, weight, torch.full_like(targets, IGNORE_INDEX))
    assert value.item() == 0 and torch.count_nonzero(grad_hidden) == 0


@pytest.mark.parametrize("tie_weights", [True, False])
def test_the_models_loss_equals_cross_entropy_of_its_logits(tie_weights, chunk_rows):
    torch.manual_seed(0)
    model = GPTModel(TINY.__class__(**{**TINY.__dict__, "tie_weights": tie_weights}))
    idx = torch.randint(0, TINY.vocab_size, (3, 12))
    targets = torch.randint(0, TINY.vocab_size, (3, 12))
    fused = model(idx, targets=targets)
    fused.backward()
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = logits_loss(model(idx), targets)
    reference.backward()
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=0)
    for a, p in zip(fused_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def test_a_lora_wrapped_head_trains_its_adapter_through_the_loss():
    torch.manual_seed(0)
    model = GPTModel(TINY)
    inject_lora(model, LoraSettings(rank=2, alpha=4))
    torch.nn.init.normal_(model.out_head.lora_B)
    idx = torch.randint(0, TINY.vocab_size, (2, 8))
    targets = torch.randint(0, TINY.vocab_size, (2, 8))
    value = model(idx, targets=targets)
    torch.testing.assert_close(value, logits_loss(model(idx), targets))
    value.backward()
    assert model.out_head.lora_B.grad.abs().sum() > 0
