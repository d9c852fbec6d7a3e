"""Text generation: greedy or sampled decoding of a batch of prompts, with a KV cache.

One decode loop, `TokenStream`, yields every step's new token per row as it is chosen, so a
caller can stream text while it is generated; `generate()` collects the same steps.
"""

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import GptflowError
from .model import GPTModel, KVCache
from .tokenizer import END_OF_TEXT_ID


def check_sampling(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    # nan passes every comparison below and inf divides the logits to nan or uniform noise.
    if not math.isfinite(temperature):
        raise GptflowError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
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


@dataclass(frozen=True)
class Sampling:
    """How a row picks its next token: the most likely one at temperature 0, else a draw."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)


class TokenStream:
    """The decode loop as an iterator: every step yields, per row, the new token id, or None for
    a row that has stopped. A row stops at `stop_id` (never yielded), at its own token limit, or
    after `stop(row)` (taking effect from the next step); iteration ends once every row has.

    Prompts of different lengths are left-padded and masked. When prompt plus new tokens
    outgrow the context, the oldest tokens are dropped as in the book's generate loop
    (the cache is then abandoned for a sliding window, so both paths stay identical).

    sampling: one Sampling for the whole batch (one random generator shared by its rows, as
    generate() draws), or one per row (each seeded row draws from its own generator, so what it
    samples does not depend on which other prompts share the batch).
    max_new_tokens: one limit for every row, or one per row.
    static_cache: attend over the whole preallocated cache every step (same shapes each step).
    compiled: decode single tokens through torch.compile (implies static_cache): worth it for long
    or many generations; the first steps pay the compilation (gpt_core.compiled keeps it cached).
    """

    def __init__(self, model: GPTModel, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int | Sequence[int], *, sampling: Sampling | Sequence[Sampling] = Sampling(),
                 stop_id: int | None = END_OF_TEXT_ID, use_cache: bool = True, static_cache: bool = False,
                 compiled: bool = False):
        if model.cfg.num_classes is not None:
            raise GptflowError(f"this model is a {model.cfg.num_classes}-class classifier, not a language model: "
                               "it cannot generate text (use `gptflow classify`)")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise GptflowError("every prompt needs at least one token")
        context = model.cfg.context_length
        longest = max(len(p) for p in prompts)
        if longest > context:
            raise GptflowError(f"prompt is {longest} tokens, longer than the model's context of {context}")
        limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(limits) != len(prompts) or any(limit < 0 for limit in limits):
            raise GptflowError("max_new_tokens must be one count >= 0, or one per prompt")
        if not isinstance(sampling, Sampling) and len(sampling) != len(prompts):
            raise GptflowError(f"got {len(sampling)} sampling settings for {len(prompts)} prompts")
        self.model = model
        self.prompts = [list(p) for p in prompts]
        self.limits = limits
        self.sampling = sampling
        self.stop_id = stop_id
        self.use_cache = use_cache
        self.static_cache = static_cache or compiled
        self.compiled = compiled
        self.finished = [limit == 0 for limit in limits]
        self.steps = 0  # decode steps taken so far (the first is the prompt's prefill)
        self._steps = self._decode()

    def __iter__(self) -> Iterator[list[int | None]]:
        return self

    def __next__(self) -> list[int | None]:
        return next(self._steps)

    def stop(self, row: int) -> None:
        """Stop `row` from the next step on; once every row has stopped, iteration ends."""
        self.finished[row] = True

    def close(self) -> None:
        """Abandon the remaining steps (restores the model's training mode at once)."""
        self._steps.close()

    def _generators(self, device):
        def make(seed):
            return None if seed is None else torch.Generator(device=device).manual_seed(seed)
        if isinstance(self.sampling, Sampling):
            return make(self.sampling.seed)
        return [make(s.seed) for s in self.sampling]

    def _pick(self, logits, generators):
        if isinstance(self.sampling, Sampling):
            s = self.sampling
            return sample_next(logits, s.temperature, s.top_k, s.top_p, generators)
        picked = logits.argmax(dim=-1)
        for row, s in enumerate(self.sampling):
            if s.temperature > 0 and not self.finished[row]:
                picked[row] = sample_next(logits[row:row + 1], s.temperature, s.top_k, s.top_p,
                                          generators[row])[0]
        return picked

    @torch.no_grad()
    def _decode(self):
        model, prompts, stop_id = self.model, self.prompts, self.stop_id
        context = model.cfg.context_length
        longest = max(len(p) for p in prompts)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            batch = len(prompts)
            tokens = torch.zeros((batch, longest), dtype=torch.long, device=device)
            real = torch.zeros((batch, longest), dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                tokens[row, longest - len(prompt):] = torch.tensor(prompt, device=device)
                real[row, longest - len(prompt):] = True
            padded = not bool(real.all())
            generators = self._generators(device)
            # Room for every step when it all fits, else the whole context (then the window slides).
            length = min(context, longest + max(self.limits))
            dtype = next(model.parameters()).dtype
            cache = KVCache(model.cfg, batch, device, dtype, max_length=length,
                            static=self.static_cache) if self.use_cache else None
            step_input = tokens
            for step in range(max(self.limits)):
                if all(self.finished):
                    break
                if cache is not None and cache.length + step_input.size(1) > context:
                    cache = None
                if cache is not None:
                    positions = (real.cumsum(dim=1)[:, -step_input.size(1):] - 1).clamp(min=0)
                    key_mask = real if padded else None
                    if padded and cache.static:
                        key_mask = F.pad(real, (0, cache.max_length - real.size(1)))
                    forward = _compiled_last_logits() if self.compiled and step_input.size(1) == 1 else last_logits
                    logits = forward(model, step_input, positions, key_mask, cache)
                else:
                    window, window_real = tokens[:, -context:], real[:, -context:]
                    positions = (window_real.cumsum(dim=1) - 1).clamp(min=0)
                    logits = last_logits(model, window, positions, window_real if padded else None, None)
                next_token = self._pick(logits, generators)
                if stop_id is not None:
                    # A stopped row goes on being fed stop_id, which no other row can see.
                    stopped = torch.tensor(self.finished, dtype=torch.bool, device=device)
                    next_token = next_token.masked_fill(stopped, stop_id)
                new = []
                for row, token in enumerate(next_token.tolist()):
                    if self.finished[row] or token == stop_id:
                        self.finished[row] = True
                        new.append(None)
                        continue
                    new.append(token)
                    if step + 1 >= self.limits[row]:
                        self.finished[row] = True
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                real = torch.cat([real, torch.ones((batch, 1), dtype=torch.bool, device=device)], dim=1)
                step_input = next_token[:, None]
                self.steps += 1
                yield new
        finally:
            model.train(was_training)


def last_logits(model: GPTModel, idx, positions, key_mask, cache):
    """The logits of each row's last position: the vocabulary projection of the others is skipped."""
    hidden = model(idx, positions, key_mask, cache, return_hidden=True)
    return model.out_head(hidden[:, -1])


@functools.cache
def _compiled_last_logits():
    # Compiled on first use: building the compiled wrapper imports the compiler stack, seconds a
    # process that never compiles should not pay.
    return torch.compile(last_logits)


def generate(model: GPTModel, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop_id: int | None = END_OF_TEXT_ID,
             use_cache: bool = True, compiled: bool = False) -> list[list[int]]:
    """New token ids for each prompt, stopping at `stop_id` (not included) or the limit.

    All of TokenStream's steps, collected; see it for padding and the sliding window.
    """
    sampling = Sampling(temperature, top_k, top_p, seed)
    stream = TokenStream(model, prompts, max_new_tokens, sampling=sampling, stop_id=stop_id, use_cache=use_cache,
                         compiled=compiled)
    generated = [[] for _ in prompts]
    for step in stream:
        for row, token in zip(generated, step):
            if token is not None:
                row.append(token)
    return generated
