"""gpt_core.tokenizer: the faster pre-tokenizer gives tiktoken's own `gpt2` tokens, every time."""

import json
import os
import random
from pathlib import Path

import pytest
import tiktoken

from gpt_core.tokenizer import END_OF_TEXT, PRETOKENIZER, get_tokenizer, stock_tokenizer

MIRROR = Path(os.environ.get("GPTFLOW_MIRROR") or Path(__file__).resolve().parents[2] / "shared/data/mirror")
pytestmark = pytest.mark.skipif(not (MIRROR / "gpt2").is_dir(), reason=f"no GPT-2 BPE files under {MIRROR}")

# Characters where the pattern's branches meet: ASCII and Unicode whitespace (no-break, ideographic,
# line separator, NEL, vertical tab), letters of several scripts, a titlecase letter, a combining
# accent, digits and other numbers, apostrophes and contraction tails, punctuation, symbols, an
# emoji with a joiner, control characters, and the end-of-text marker spelt out.
PARTS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\x0b", "\x0c", "\x85", "\u00a0", "\u2028", "\u3000",
         "\u200b", "a", "Z", "the", " cat", "é", "ß", "ж", "中文", "ǅ", "e\u0301", "7", "42", "٣", "²", "Ⅻ", "½",
         "'", "’", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", ".", "!", "?!", "--", "—", "(", "$",
         "+", "🙂", "👩\u200d💻", "\x00", "\x1f", "\x7f", END_OF_TEXT]


def random_texts(count: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choices(PARTS, k=rng.randint(1, 24))) for _ in range(count)]


@pytest.fixture(scope="module")
def encodings():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GPTFLOW_MIRROR", str(MIRROR))
        yield get_tokenizer(), stock_tokenizer()


def test_same_vocabulary_other_pattern(encodings):
    ours, stock = encodings
    assert (ours.name, ours.n_vocab, ours.eot_token) == ("gpt2", 50257, 50256)
    assert ours._pat_str == PRETOKENIZER != stock._pat_str


def test_random_text_at_the_branches_meeting_points(encodings):
    ours, stock = encodings
    for text in random_texts(4000):
        assert ours.encode_ordinary(text) == stock.encode_ordinary(text), repr(text)
        assert ours.encode(text, allowed_special="all") == stock.encode(text, allowed_special="all"), repr(text)


@pytest.mark.parametrize("name", ["the-verdict.txt", "tinyshakespeare/input.txt", "instruction-data.json"])
def test_the_corpora(encodings, name):
    ours, stock = encodings
    text = (MIRROR / name).read_text(encoding="utf-8")
    if name.endswith(".json"):
        text = "\n".join(value for entry in json.loads(text) for value in entry.values())
    assert ours.encode_ordinary(text) == stock.encode_ordinary(text)


def test_a_wrong_pattern_is_caught(encodings):
    # The random texts above would notice the lookahead going missing.
    ours, stock = encodings
    broken = tiktoken.Encoding("broken", pat_str=PRETOKENIZER.replace(r"\s+(?!\S)|", ""),
                               mergeable_ranks=ours._mergeable_ranks, special_tokens=ours._special_tokens)
    assert any(broken.encode_ordinary(t) != stock.encode_ordinary(t) for t in random_texts(200))
