"""Streamed text: pieces never split a character, and joined they equal the one-shot result
(decode, stop-string cut, extract_response)."""

import random

import pytest

from gpt_core.prompts import STYLES, extract_response, response_header
from gpt_core.streaming import AnswerText, StopStrings, TextStream, Utf8Text
from gpt_core.tokenizer import get_tokenizer

TEXTS = ["🙂 héllo 你好, wörld", "naïve café — 日本語のテキスト 🎉🎉", "plain ascii only",
         "Ω≈ç√∫˜µ≤≥÷ 👩‍👩‍👧"]


def pieces(text: str, rng: random.Random) -> list[str]:
    """`text` cut at random places (some pieces empty)."""
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 6)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def test_characters_split_across_tokens_come_out_whole():
    tokenizer = get_tokenizer()
    for text in TEXTS:
        ids = tokenizer.encode_ordinary(text)
        utf8 = Utf8Text(tokenizer)
        out = [utf8.feed(i) for i in ids] + [utf8.flush()]
        assert "\ufffd" not in "".join(out)
        assert "".join(out) == text
    # The emoji is two tokens of two bytes each: nothing comes out after the first.
    utf8 = Utf8Text(tokenizer)
    first, second = tokenizer.encode_ordinary("🙂")
    assert (utf8.feed(first), utf8.feed(second)) == ("", "🙂")


def test_invalid_bytes_decode_as_the_tokenizer_does():
    tokenizer, rng = get_tokenizer(), random.Random(0)
    for _ in range(200):
        # Byte tokens (ids 0..255 are single bytes) and a few whole ones: mostly invalid UTF-8.
        ids = [rng.choice([rng.randrange(256), rng.randrange(50256)]) for _ in range(rng.randint(1, 12))]
        utf8 = Utf8Text(tokenizer)
        assert "".join([utf8.feed(i) for i in ids] + [utf8.flush()]) == tokenizer.decode(ids)


def cut_at_first(text, stops):
    found = [i for s in stops if s and (i := text.find(s)) >= 0]
    return text[:min(found)] if found else text


def test_stop_strings_cut_as_the_whole_text_would_be_cut():
    rng = random.Random(1)
    for _ in range(3000):
        text = "".join(rng.choice("abc d") for _ in range(rng.randint(0, 14)))
        stops = ["".join(rng.choice("abcd") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        matcher = StopStrings(stops)
        out = "".join(matcher.feed(p) for p in pieces(text, rng)) + matcher.flush()
        assert out == cut_at_first(text, stops), (text, stops)
        assert matcher.matched == (out != text or any(s in text for s in stops))


def test_a_longer_stop_that_starts_earlier_wins():
    matcher = StopStrings(["abcd", "c"])
    assert matcher.feed("abc") == ""  # "c" is complete, but "abcd" may still begin at 0
    assert matcher.feed("d tail") == "" and matcher.matched


@pytest.mark.parametrize("style", STYLES)
def test_answer_clean_up_matches_extract_response(style):
    rng = random.Random(2)
    header = response_header(style).strip()
    parts = [header, header[:5], " ", "\n", "\t", "ok", "x y", "\n\n"]
    for _ in range(3000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 6)))
        answer = AnswerText(style)
        out = "".join(answer.feed(p) for p in pieces(text, rng)) + answer.flush()
        assert out == extract_response(text, "a prompt not in the text", style), repr(text)


def test_text_stream_of_an_answer_with_a_stop_string():
    tokenizer = get_tokenizer()
    raw = "\n### Response:\n  Paris is 🙂 nice.\nUSER: more\n"
    stream = TextStream(tokenizer, stop=["USER:"], style="alpaca")
    out = [stream.feed(i) for i in tokenizer.encode_ordinary(raw)]
    assert stream.stopped
    assert "".join(out) + stream.finish() == "Paris is 🙂 nice."
    assert all("\ufffd" not in piece for piece in out)
