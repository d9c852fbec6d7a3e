"""Text while it is generated, one token at a time.

`TextStream` turns each new token id into the text that is now certain, in three stages:

1. UTF-8: a token may end inside a character (GPT-2's byte-level BPE splits emoji and most
   non-Latin characters across tokens); the incomplete bytes wait for the next token, so no half
   character is ever emitted. Invalid bytes become U+FFFD exactly as tokenizer.decode() does.
2. Stop strings: text is cut before the first occurrence of any of them; a tail that could still
   become one (or an earlier one) is held back until it is decided.
3. For an instruction-tuned model, the answer is cleaned as extract_response() cleans it
   (surrounding whitespace, a repeated response header); trailing whitespace is held back until
   more text follows, since the end of the answer would drop it.

All the pieces joined equal the one-shot result, so a streamed answer and an unstreamed one are
the same text.
"""

import codecs
from collections.abc import Sequence

import tiktoken

from .prompts import response_header


class Utf8Text:
    """Token ids to text, never emitting part of a character."""

    def __init__(self, tokenizer: tiktoken.Encoding):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> str:
        return self._decoder.decode(self._tokenizer.decode_single_token_bytes(token))

    def flush(self) -> str:
        """What is left at the end: bytes of an unfinished character become U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopStrings:
    """Cuts text before the first occurrence of any stop string."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.matched = False
        self._held = ""

    def _first_match(self, text: str) -> int | None:
        found = [i for s in self.stops if (i := text.find(s)) >= 0]
        return min(found, default=None)

    def _pending(self, text: str) -> int | None:
        """Where the longest tail of `text` that begins some stop string starts, if any."""
        for start in range(max(0, len(text) - max(map(len, self.stops)) + 1), len(text)):
            tail = text[start:]
            if any(len(tail) < len(s) and s.startswith(tail) for s in self.stops):
                return start
        return None

    def feed(self, text: str) -> str:
        if self.matched:
            return ""
        if not self.stops:
            return text
        text = self._held + text
        match, pending = self._first_match(text), self._pending(text)
        if match is not None and (pending is None or pending >= match):
            self.matched, self._held = True, ""
            return text[:match]
        safe = len(text) if pending is None else pending
        self._held = text[safe:]
        return text[:safe]

    def flush(self) -> str:
        text, self._held = self._held, ""
        match = self._first_match(text)
        if match is not None:
            self.matched = True
            return text[:match]
        return text


class AnswerText:
    """extract_response()'s clean-up of an answer (not echoing its prompt), piece by piece:
    strip it, drop the style's response header if the answer opens with it, strip again."""

    def __init__(self, style: str):
        self._header = response_header(style).strip()
        self._phase = "opening"  # -> "after header" -> "body"
        self._held = ""

    def feed(self, text: str) -> str:
        text = self._held + text
        self._held = ""
        if self._phase != "body":
            stripped = text.lstrip()
            if not stripped:
                return ""
            if self._phase == "opening":
                if len(stripped) < len(self._header) and self._header.startswith(stripped):
                    self._held = stripped  # may yet become the header
                    return ""
                if stripped.startswith(self._header):
                    self._phase = "after header"
                    return self.feed(stripped[len(self._header):])
            self._phase = "body"
            text = stripped
        body = text.rstrip()
        self._held = text[len(body):]
        return body

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text.strip() if self._phase == "opening" else ""


class TextStream:
    """One generation's text: feed() each new token, then finish() once; see the module doc.

    style: the prompt style of an instruction-tuned model whose answer is cleaned, or None for
    raw text (a base model's completion).
    """

    def __init__(self, tokenizer: tiktoken.Encoding, *, stop: Sequence[str] = (), style: str | None = None):
        self._utf8 = Utf8Text(tokenizer)
        self._stops = StopStrings(stop)
        self._answer = AnswerText(style) if style else None
        self.tokens = 0

    @property
    def stopped(self) -> bool:
        """A stop string has been reached: further tokens add nothing."""
        return self._stops.matched

    def _clean(self, text: str) -> str:
        return self._answer.feed(text) if self._answer else text

    def feed(self, token: int) -> str:
        self.tokens += 1
        return self._clean(self._stops.feed(self._utf8.feed(token)))

    def finish(self) -> str:
        text = self._clean(self._stops.feed(self._utf8.flush()) + self._stops.flush())
        return text + (self._answer.flush() if self._answer else "")
