"""Text generation: greedy or sampled decoding of a batch of prompts, with a KV cache."""

from collections.abc import Sequence

import torch

from .errors import GptflowError
from .model import GPTModel, KVCache
from .tokenizer import END_OF_TEXT_ID


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    if temperature < 0:
        raise GptflowError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GptflowError(f"top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GptflowError(f"top-p must be in (0, 1], got {top_p}")


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """One next-token id per row of `logits` (batch, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p of the mass;
        # the best token is always kept.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPTModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_id: int | None = END_OF_TEXT_ID,
             use_cache: bool = True) -> list[list[int]]:
    """New token ids for each prompt, stopping at `stop_id` (not included) or the limit.

    Prompts of different lengths are left-padded and masked. When prompt plus new tokens
    outgrow the context, the oldest tokens are dropped as in the book's generate loop
    (the cache is then abandoned for a sliding window, so both paths stay identical).
    """
    check_sampling(temperature, top_k, top_p)
    if model.cfg.num_classes is not None:
        raise GptflowError(f"this model is a {model.cfg.num_classes}-class classifier, not a language model: "
                           "it cannot generate text (use `gptflow classify`)")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GptflowError("every prompt needs at least one token")
    context = model.cfg.context_length
    longest = max(len(p) for p in prompts)
    if longest > context:
        raise GptflowError(f"prompt is {longest} tokens, longer than the model's context of {context}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    batch = len(prompts)
    tokens = torch.zeros((batch, longest), dtype=torch.long, device=device)
    real = torch.zeros((batch, longest), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), device=device)
        real[row, longest - len(prompt):] = True
    padded = not bool(real.all())
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    cache = KVCache(model.cfg, batch, device, next(model.parameters()).dtype) if use_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens = []
    step_input = tokens
    for _ in range(max_new_tokens):
        if cache is not None and cache.length + step_input.size(1) > context:
            cache = None
        if cache is not None:
            positions = real.cumsum(dim=1)[:, -step_input.size(1):] - 1
            hidden = model(step_input, positions.clamp(min=0), real if padded else None, cache, return_hidden=True)
        else:
            window, window_real = tokens[:, -context:], real[:, -context:]
            positions = (window_real.cumsum(dim=1) - 1).clamp(min=0)
            hidden = model(window, positions, window_real if padded else None, return_hidden=True)
        # Only the last position's logits are needed: skip the vocabulary projection elsewhere.
        next_token = sample_next(model.out_head(hidden[:, -1]), temperature, top_k, top_p, generator)
        if stop_id is not None:
            next_token = next_token.masked_fill(finished, stop_id)
            finished |= next_token == stop_id
        new_tokens.append(next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        real = torch.cat([real, torch.ones((batch, 1), dtype=torch.bool, device=device)], dim=1)
        step_input = next_token[:, None]
        if bool(finished.all()):
            break

    model.train(was_training)
    if not new_tokens:
        return [[] for _ in prompts]
    generated = torch.stack(new_tokens, dim=1).tolist()
    if stop_id is None:
        return generated
    return [row[:row.index(stop_id)] if stop_id in row else row for row in generated]
