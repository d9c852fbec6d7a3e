"""Instruction data collation, the instruction dataset and batched response generation."""

import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from gpt_core.config import get_preset
from gpt_core.errors import GptflowError
from gpt_core.instruct import Example, InstructionDataset, collate, generate_responses
from gpt_core.model import GPTModel
from gpt_core.prompts import STYLES, format_example, format_prompt
from gpt_core.tokenizer import get_tokenizer

MIRROR = Path(os.environ.get("GPTFLOW_MIRROR") or Path(__file__).resolve().parents[2] / "shared/data/mirror")
EOT = 50256

ENTRIES = [
    {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
     "output": "The correct spelling is 'Occasion.'"},
    {"instruction": "What is an antonym of 'complicated'?", "input": "",
     "output": "An antonym of 'complicated' is 'simple'."},
    {"instruction": "Convert 45 kilometers to meters.", "output": "45 kilometers is 45000 meters."},
]


@pytest.fixture
def tokenizer(monkeypatch, tmp_path):
    if not MIRROR.is_dir():
        pytest.skip(f"no mirror folder at {MIRROR}; set GPTFLOW_MIRROR to the shared data mirror")
    monkeypatch.setenv("GPTFLOW_MIRROR", str(MIRROR))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    return get_tokenizer()


def test_the_books_worked_example():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert targets.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, -100, -100, -100],
                                [8, 9, EOT, -100, -100]]


def test_sequences_already_ending_in_end_of_text_get_no_second_one():
    examples = [Example([0, 1, 2, 3, 4, EOT], 2), Example([5, 6, EOT], 1), ([7, 8, 9, EOT], 1)]
    assert [t.tolist() for t in collate(examples)] == [
        t.tolist() for t in collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])]


def test_truncation_keeps_inputs_and_targets_aligned():
    rows = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [5, 8, 9, 7, 9]]
    full_inputs, full_targets = collate(rows)
    inputs, targets = collate(rows, allowed_max_length=4)
    assert inputs.shape == targets.shape == (3, 4)
    assert torch.equal(inputs, full_inputs[:, :4]) and torch.equal(targets, full_targets[:, :4])
    for row, (inp, tgt) in enumerate(zip(inputs.tolist(), targets.tolist())):
        sequence = rows[row] + [EOT]
        for i, target in enumerate(tgt):
            if target != -100:
                assert inp[i] == sequence[i] and target == sequence[i + 1]


def test_prompt_masking_leaves_only_response_and_end_of_text():
    batch = [Example([10, 11, 12, 20, 21, EOT], prompt_length=3), Example([13, 22, EOT], 1)]
    _, plain = collate(batch)
    _, masked = collate(batch, mask_prompt=True)
    assert plain.tolist() == [[11, 12, 20, 21, EOT], [22, EOT, -100, -100, -100]]
    assert masked.tolist() == [[-100, -100, 20, 21, EOT], [22, EOT, -100, -100, -100]]

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50257)
    loss = lambda targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    assert not torch.isclose(loss(plain), loss(masked))


def test_prompt_masking_needs_prompt_lengths():
    with pytest.raises(GptflowError, match="mask_prompt needs"):
        collate([[1, 2, 3]], mask_prompt=True)


def test_a_prompt_longer_than_allowed_is_refused_or_truncated():
    batch = [Example([1, 2, 3, EOT], 1, index=0), Example([4, 5, 6, 7, 8, 9, EOT], 5, index=7)]
    with pytest.raises(GptflowError, match=r"example #7 has a 5-token prompt.*allowed_max_length 4"):
        collate(batch, allowed_max_length=4, overflow="error")
    with pytest.raises(GptflowError, match="example at batch position 1"):
        collate([([1, EOT], 1), ([4, 5, 6, 7, 8, 9], 5)], allowed_max_length=4, overflow="error")

    inputs, targets = collate(batch, allowed_max_length=4, mask_prompt=True)
    assert inputs.tolist() == [[1, 2, 3, EOT], [4, 5, 6, 7]]
    assert targets.tolist() == [[2, 3, EOT, -100], [-100, -100, -100, -100]]


def test_bad_collate_options():
    with pytest.raises(GptflowError, match="overflow must be one of truncate, error"):
        collate([[1, 2]], overflow="drop")
    with pytest.raises(GptflowError, match="allowed_max_length must be at least 1"):
        collate([[1, 2]], allowed_max_length=0)


@pytest.mark.parametrize("style", STYLES)
def test_dataset_encodes_prompt_response_and_end_of_text(tokenizer, style):
    dataset = InstructionDataset(ENTRIES, tokenizer, style)
    assert len(dataset) == len(ENTRIES)
    for index, entry in enumerate(ENTRIES):
        tokens, prompt_length, example_index = dataset[index]
        assert example_index == index
        assert tokens == tokenizer.encode(format_example(entry, style)) + [EOT]
        assert tokens[:prompt_length] == tokenizer.encode(format_prompt(entry, style))


def test_dataset_through_a_dataloader(tokenizer):
    dataset = InstructionDataset(ENTRIES, tokenizer, "alpaca")
    loader = DataLoader(dataset, batch_size=3, collate_fn=partial(collate, mask_prompt=True))
    inputs, targets = next(iter(loader))
    for row, (tokens, prompt_length, _) in enumerate(dataset):
        learned = [t for t in targets[row].tolist() if t != -100]
        assert learned == tokens[prompt_length:]  # the response and one end-of-text
        assert inputs[row, :len(tokens) - 1].tolist() == tokens[:-1]


def test_generate_responses_is_batch_size_independent_and_survives_long_prompts(tokenizer):
    torch.manual_seed(0)
    # Untied: with the output head tied to the embedding a random model only repeats the prompt's
    # last token ("\n"), every response would be "" and the comparison below would prove nothing.
    model = GPTModel(get_preset("gpt-nano", tie_weights=False))
    entries = ENTRIES + [{"instruction": "Summarize: " + "a very long text " * 100, "output": ""}]
    calls = []
    one = generate_responses(model, tokenizer, entries, style="alpaca", max_new_tokens=6,
                             batch_size=1, progress=lambda done, total: calls.append((done, total)))
    three = generate_responses(model, tokenizer, entries, style="alpaca", max_new_tokens=6,
                               batch_size=3)
    assert len(one) == len(entries) and all(one) and len(set(one)) == len(one)
    assert one == three
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # More new tokens than half the context: generation slides its window instead of failing.
    assert len(generate_responses(model, tokenizer, entries[-1:], style="phi3",
                                  max_new_tokens=34)) == 1
