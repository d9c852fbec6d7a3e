"""oneDNN-packed linear weights: the same outputs and tokens as the plain model, the same
parameters, and a plain F.linear wherever packing cannot serve (gradients, autocast, stale)."""

import copy

import pytest
import torch

from gpt_core.config import ModelConfig
from gpt_core.generate import generate
from gpt_core.model import GPTModel
from gpt_core.packed import PackedLinear, pack_linear_weights, packing_supported
from gpt_core.precision import bf16_supported
from gpt_core.weights import load_language_model, save_model

pytestmark = pytest.mark.skipif(not packing_supported("cpu"), reason="this PyTorch build has no oneDNN")

CFG = ModelConfig(vocab_size=97, context_length=32, emb_dim=64, n_heads=4, n_layers=2, tie_weights=True)
PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 4], [9] * 4]  # left-padded to the longest


def twins(dtype):
    torch.manual_seed(0)
    plain = GPTModel(CFG).to(dtype).eval()
    return plain, pack_linear_weights(copy.deepcopy(plain))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_model_decodes_the_plain_models_tokens(dtype):
    plain, packed = twins(dtype)
    linears = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(linears) == 4 * CFG.n_layers + 1  # qkv, out_proj, two feed-forward layers; the head
    idx = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = plain(idx), packed(idx)
    if dtype == torch.bfloat16 and bf16_supported("cpu"):
        assert torch.equal(got, want)  # the same oneDNN kernels, only the weight's layout differs
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # another summation order
    for options in ({}, {"temperature": 1.0, "top_k": 20, "seed": 3}):
        assert generate(packed, PROMPTS, 12, stop_id=None, **options) == \
            generate(plain, PROMPTS, 12, stop_id=None, **options)


def test_packing_keeps_the_parameters_and_the_tie():
    plain, packed = twins(torch.float32)
    assert packed.out_head.weight is packed.tok_emb.weight
    assert list(packed.state_dict()) == list(plain.state_dict())
    assert packed.num_parameters() == plain.num_parameters()
    copied = copy.deepcopy(packed)  # the opaque packed tensor is not copied; the copy packs its own
    idx = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(copied(idx), packed(idx))


def test_gradients_autocast_and_changed_weights_take_the_plain_path():
    plain, packed = twins(torch.float32)
    idx = torch.tensor([[1, 2, 3, 4]])
    packed.train()
    loss = packed(idx, targets=torch.tensor([[2, 3, 4, 5]]))
    loss.backward()
    assert packed.trf_blocks[0].att.qkv.weight.grad is not None
    packed.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed(idx).dtype == torch.bfloat16  # autocast reached F.linear
    with torch.no_grad():
        for model in (plain, packed):
            model.trf_blocks[1].ff.layers[0].weight.mul_(-2)
        torch.testing.assert_close(packed(idx), plain(idx), rtol=1e-4, atol=1e-5)


def test_a_model_loaded_to_generate_is_packed_in_its_precision(tmp_path):
    plain, _ = twins(torch.float32)
    save_model(plain, tmp_path / "model")
    model, _, _ = load_language_model(tmp_path / "model")
    assert isinstance(model.trf_blocks[0].att.qkv, PackedLinear) and isinstance(model.out_head, PackedLinear)
    dtype = torch.bfloat16 if bf16_supported("cpu") else torch.float32
    assert model.tok_emb.weight.dtype == dtype
    assert generate(model, PROMPTS, 12, stop_id=None) == generate(plain.to(dtype), PROMPTS, 12, stop_id=None)


def test_a_model_moved_off_the_cpu_multiplies_plainly():
    _, packed = twins(torch.float32)
    packed.to("meta")  # stands in for a GPU: the packed copy is the CPU's
    with torch.no_grad():
        assert packed(torch.tensor([[1, 2, 3]], device="meta")).shape == (1, 3, CFG.vocab_size)
