"""Instruction fine-tuning data and response generation (the book's chapter 7).

Batch items handed to `collate` are either plain token sequences (the book's format; the whole
sequence is learned) or `Example`s, i.e. (tokens, prompt_length[, index]) tuples, which
`InstructionDataset` yields and which make prompt masking and overflow checks possible.
"""

import numbers
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, NamedTuple

import tiktoken
import torch
from torch.utils.data import Dataset

from .errors import GptflowError
from .generate import generate
from .loss import IGNORE_INDEX
from .model import GPTModel
from .prompts import extract_response, format_example, format_prompt
from .tokenizer import END_OF_TEXT_ID, encode_literal

Overflow = Literal["truncate", "error"]
OVERFLOW_MODES = typing.get_args(Overflow)


class Example(NamedTuple):
    tokens: Sequence[int]
    prompt_length: int | None  # None for a plain token list: no prompt known
    index: int | None = None  # position in the dataset, so errors can name the example


class InstructionDataset(Dataset):
    """Entries pre-encoded as prompt + response + end-of-text, one `Example` per entry.

    Prompt and response are encoded separately so the prompt tokens are exactly those the model
    sees at generation time and the prompt length is exact (for ordinary entries this equals
    encoding `format_example` in one go).
    """

    def __init__(self, entries: Sequence[Mapping], tokenizer: tiktoken.Encoding,
                 style: str = "alpaca"):
        self.examples = []
        for index, entry in enumerate(entries):
            prompt = format_prompt(entry, style)
            response = format_example(entry, style)[len(prompt):]
            prompt_ids = encode_literal(tokenizer, prompt)
            tokens = prompt_ids + encode_literal(tokenizer, response) + [END_OF_TEXT_ID]
            self.examples.append(Example(tokens, len(prompt_ids), index))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


def _as_example(item) -> Example:
    if isinstance(item, tuple) and len(item) in (2, 3) and not isinstance(item[0], numbers.Integral):
        return Example(*item)
    return Example(item, prompt_length=None)


def collate(batch: Sequence, *, pad_token_id: int = END_OF_TEXT_ID, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: int | None = None, mask_prompt: bool = False,
            overflow: str = "truncate", device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for next-token training, as the book's `custom_collate_fn`.

    Each sequence is ended with one end-of-text (`pad_token_id`, appended unless the sequence
    already ends with it, as InstructionDataset's do), padded to the longest, and shifted by one.
    That end-of-text stays a target so the model learns to stop; targets past it are
    `ignore_index`. `mask_prompt` also ignores the targets that are prompt tokens (exercise 7.2).
    `allowed_max_length` cuts inputs and targets alike after the shift, so targets[i] is always
    the token after inputs[i]. An example whose prompt alone exceeds it would keep no response
    token: overflow="error" refuses it, "truncate" keeps the cut row as the book does.
    All options are keyword-only so `functools.partial(collate, ...)` can be a DataLoader's
    `collate_fn`.
    """
    if overflow not in OVERFLOW_MODES:
        raise GptflowError(f"overflow must be one of {', '.join(OVERFLOW_MODES)}, got {overflow!r}")
    if allowed_max_length is not None and allowed_max_length < 1:
        raise GptflowError(f"allowed_max_length must be at least 1, got {allowed_max_length}")
    examples = [_as_example(item) for item in batch]
    if mask_prompt and any(ex.prompt_length is None for ex in examples):
        raise GptflowError("mask_prompt needs (tokens, prompt_length) items, such as "
                           "InstructionDataset's, not plain token lists")
    if allowed_max_length is not None and overflow == "error":
        for position, ex in enumerate(examples):
            if ex.prompt_length is not None and ex.prompt_length > allowed_max_length:
                name = f"#{ex.index}" if ex.index is not None else f"at batch position {position}"
                raise GptflowError(
                    f"instruction example {name} has a {ex.prompt_length}-token prompt, longer "
                    f"than allowed_max_length {allowed_max_length}, so no response token would "
                    "be left to learn from: shorten it, raise allowed_max_length or use "
                    "overflow='truncate'")

    sequences = []
    for ex in examples:
        tokens = [int(t) for t in ex.tokens]
        if not tokens or tokens[-1] != pad_token_id:
            tokens.append(pad_token_id)
        sequences.append(tokens)
    width = max(len(seq) for seq in sequences) - 1
    inputs = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), ignore_index, dtype=torch.long)
    for row, (ex, seq) in enumerate(zip(examples, sequences)):
        inputs[row, :len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
        targets[row, :len(seq) - 1] = torch.tensor(seq[1:], dtype=torch.long)
        if mask_prompt:
            # targets[i] is token i + 1, so the first prompt_length - 1 targets are prompt tokens.
            targets[row, :max(ex.prompt_length - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.to(device), targets.to(device)


def generate_responses(model: GPTModel, tokenizer: tiktoken.Encoding, entries: Sequence[Mapping],
                       *, style: str, max_new_tokens: int = 256, batch_size: int = 8,
                       temperature: float = 0.0, stop_id: int | None = END_OF_TEXT_ID,
                       progress: Callable[[int, int], None] | None = None, compiled: bool = False) -> list[str]:
    """The model's response to each entry, in order (greedy unless temperature > 0).

    A prompt longer than the model can take is cut from the left, keeping its end, which holds
    the response header. It is cut to leave room for max_new_tokens, but never to less than half
    the context: beyond that, generate() slides its window as the book's loop does.
    Entries are batched by prompt length to keep padding small. `progress(done, total)` is
    called after each batch.
    """
    if batch_size < 1:
        raise GptflowError(f"batch_size must be at least 1, got {batch_size}")
    context = model.cfg.context_length
    budget = context - min(max_new_tokens, context // 2)
    prompts = [encode_literal(tokenizer, format_prompt(entry, style))[-budget:] for entry in entries]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        new_tokens = generate(model, [prompts[i] for i in chunk], max_new_tokens,
                              temperature=temperature, stop_id=stop_id, compiled=compiled)
        for i, tokens in zip(chunk, new_tokens):
            prompt = format_prompt(entries[i], style)
            responses[i] = extract_response(tokenizer.decode(tokens), prompt, style)
        if progress is not None:
            progress(start + len(chunk), len(order))
    return responses
