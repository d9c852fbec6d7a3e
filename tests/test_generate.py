"""Generation: cache and no-cache agree, padding is invisible, sampling is seeded, and we
match transformers' greedy decoding."""

import pytest
import torch

from gpt_core.config import ModelConfig
from gpt_core.errors import GptflowError
from gpt_core.generate import Sampling, TokenStream, generate
from gpt_core.model import GPTModel
from gpt_core.weights import load_model

CONTEXT = 16
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(ModelConfig(vocab_size=97, context_length=CONTEXT, emb_dim=32, n_heads=4, n_layers=2)).eval()


@pytest.mark.parametrize("new_tokens", [4, 20])  # 20 outgrows the context: a sliding window
def test_cache_and_no_cache_agree(model, new_tokens):
    cached = generate(model, [PROMPT], new_tokens, stop_id=None)
    uncached = generate(model, [PROMPT], new_tokens, stop_id=None, use_cache=False)
    assert cached == uncached
    assert len(cached[0]) == new_tokens


PROMPTS = [PROMPT, [3, 4], [9] * 7]  # left-padded to the longest


def stream_tokens(model, prompts, new_tokens, **options):
    out = [[] for _ in prompts]
    for step in TokenStream(model, prompts, new_tokens, stop_id=None, **options):
        for row, token in zip(out, step):
            if token is not None:
                row.append(token)
    return out


@pytest.mark.parametrize("new_tokens", [4, 20])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, top_k=20, seed=3)], ids=["greedy", "sampled"])
def test_static_cache_decodes_the_tokens_of_the_dynamic_cache(model, new_tokens, sampling):
    dynamic = stream_tokens(model, PROMPTS, new_tokens, sampling=sampling)
    assert stream_tokens(model, PROMPTS, new_tokens, sampling=sampling, static_cache=True) == dynamic


def test_compiled_decode_steps_give_the_eager_tokens(model):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager = generate(model, PROMPTS, 5, stop_id=None)
    assert generate(model, PROMPTS, 5, stop_id=None, compiled=True) == eager
    # One graph for the first step, one with the cache length symbolic for every later step.
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_batch_matches_prompts_alone(model, use_cache):
    prompts = [PROMPT, [40, 41, 42], [70]]
    batched = generate(model, prompts, 8, stop_id=None, use_cache=use_cache)
    alone = [generate(model, [p], 8, stop_id=None, use_cache=use_cache)[0] for p in prompts]
    assert batched == alone


def test_sampling_is_seeded(model):
    def sample(seed):
        return generate(model, [PROMPT], 20, temperature=1.0, seed=seed, stop_id=None)
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_one_is_greedy(model):
    greedy = generate(model, [PROMPT], 12, stop_id=None)
    assert generate(model, [PROMPT], 12, temperature=1.5, top_k=1, seed=3, stop_id=None) == greedy
    assert generate(model, [PROMPT], 12, temperature=1.5, top_p=1e-9, seed=3, stop_id=None) == greedy


def test_stops_before_stop_id(model):
    free = generate(model, [PROMPT], 12, stop_id=None)[0]
    stop = free[3]
    assert generate(model, [PROMPT], 12, stop_id=stop)[0] == free[:free.index(stop)]


@pytest.mark.parametrize("options, message", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": 1.0, "top_k": 0}, "top-k"),
    ({"temperature": 1.0, "top_p": 0.0}, "top-p"),
    ({"temperature": 1.0, "top_p": 1.5}, "top-p"),
])
def test_invalid_sampling_options_fail(model, options, message):
    with pytest.raises(GptflowError, match=message):
        generate(model, [PROMPT], 3, **options)


def test_prompt_longer_than_context_fails(model):
    with pytest.raises(GptflowError, match="longer than the model's context of 16"):
        generate(model, [list(range(CONTEXT + 1))], 3)


def test_greedy_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # A wider initialisation than GPT-2's keeps a random model from repeating one token.
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=50257,
                                     initializer_range=0.2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path)
    prompt = torch.randint(0, 50257, (1, 12))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                           do_sample=False, pad_token_id=50256)[0, 12:].tolist()
    assert generate(ours, [prompt[0].tolist()], 20, stop_id=None)[0] == expected


def test_stream_yields_each_step_as_generate_collects_it(model):
    prompts = [PROMPT, [40, 41, 42]]
    free = generate(model, prompts, 6, stop_id=None)
    stop = free[1][2]  # the second row stops at its third token
    stream = TokenStream(model, prompts, 6, stop_id=stop)
    steps = list(stream)
    rows = [[t for t in column if t is not None] for column in zip(*steps)]
    assert rows == generate(model, prompts, 6, stop_id=stop)
    assert [step[1] for step in steps[2:]] == [None] * (len(steps) - 2)
    assert stream.finished == [True, True]


def test_stream_rows_have_their_own_limits_and_can_be_stopped(model):
    stream = TokenStream(model, [PROMPT, [40, 41, 42], [70]], [2, 5, 0], stop_id=None)
    first = next(stream)
    assert first[2] is None and None not in first[:2]
    stream.stop(1)
    second = next(stream)
    assert second[1] is None and second[0] is not None
    assert list(stream) == []  # row 0 reached its limit of 2, the others are stopped
    assert stream.steps == 2 and stream.finished == [True, True, True]


def test_seeded_rows_sample_the_same_whatever_shares_the_batch(model):
    def run(prompts, sampling):
        return [[t for t in col if t is not None] for col in zip(*TokenStream(
            model, prompts, 8, sampling=sampling, stop_id=None))]
    seeded = Sampling(temperature=1.0, seed=5)
    alone = run([PROMPT], [seeded])[0]
    assert run([[40, 41], PROMPT], [Sampling(temperature=1.0, seed=9), seeded])[1] == alone
    assert run([[40, 41], PROMPT], [Sampling(), seeded])[1] == alone
    greedy = generate(model, [[40, 41]], 8, stop_id=None)[0]
    assert run([[40, 41], PROMPT], [Sampling(), seeded])[0] == greedy
