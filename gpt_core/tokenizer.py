"""GPT-2's byte-pair encoding through tiktoken, usable offline, with a faster pre-tokenizer.

tiktoken downloads the two BPE files on first use and caches them under the SHA-1 of their
URL. Where the internet is out of reach we seed that cache ourselves, from GPTFLOW_MIRROR,
with the checksums tiktoken itself checks.

Before BPE, text is split into pre-tokens by GPT-2's pattern. tiktoken spells it

    '(?:[sdmt]|ll|ve|re)| ?\\p{L}++| ?\\p{N}++| ?[^\\s\\p{L}\\p{N}]++|\\s++$|\\s+(?!\\S)|\\s

Its regex engine, fancy_regex, hands lookaround-free parts of a pattern to the `regex` crate's
automata and runs the rest in a backtracking VM. The possessive quantifiers (atomic groups to
it) and the lookahead put every branch in the VM, tried one after another for each pre-token.
PRETOKENIZER groups the four lookaround-free branches into one: a word, number, punctuation run
or contraction, nearly every pre-token, is then one automaton match (1.5x faster encoding).
The pre-tokens are the same: inside the group the `regex` crate picks by branch order, as a
backtracking engine does; a possessive and a greedy quantifier differ only when something after
them can fail, and nothing follows those four; and a whitespace run that reaches the end of the
text, which tiktoken's `\\s++$` takes whole, is taken whole by `\\s+(?!\\S)` too. The tests hold
the result to tiktoken's own `gpt2` encoding, token for token.
"""

import functools
import hashlib
import os
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import gpt2

from .download import fetch_url, mirror_url
from .errors import GptflowError

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256
PRETOKENIZER = r"""(?:'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+)|\s+(?!\S)|\s"""

_BPE_BASE = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# (file name, sha256) of what tiktoken's `gpt2` encoding fetches; the mirror keeps them in gpt2/.
BPE_FILES = (
    ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
)


def _cache_dir() -> Path:
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(name):
            return Path(os.environ[name])
    return Path.home() / ".cache" / "gptflow" / "tiktoken"


def seed_bpe_cache(source: str | Path | None = None) -> Path:
    """Put the BPE files where tiktoken looks for them; returns the cache folder.

    They come from `source`, a folder or URL laid out as the mirror (gpt2/vocab.bpe,
    gpt2/encoder.json: what `write_bpe_files` writes), else from GPTFLOW_MIRROR, else from
    OpenAI. Either way they are checked against the checksums tiktoken checks.
    """
    cache = _cache_dir()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache))
    mirror = str(source) if source is not None else os.environ.get("GPTFLOW_MIRROR")
    for name, sha256 in BPE_FILES:
        url = _BPE_BASE + name
        target = cache / hashlib.sha1(url.encode()).hexdigest()
        source = mirror_url(mirror, f"gpt2/{name}") if mirror else url
        try:
            fetch_url(source, target, sha256, progress=False, label=f"GPT-2 BPE file {name}")
        except GptflowError as err:
            raise GptflowError(
                f"cannot load the GPT-2 tokenizer: {err}. Set GPTFLOW_MIRROR to a folder or URL "
                f"that holds gpt2/{name}, or TIKTOKEN_CACHE_DIR to a seeded tiktoken cache") from None
    return cache


def write_bpe_files(folder: str | Path) -> Path:
    """Copy the BPE files into `folder`/gpt2/, the layout `seed_bpe_cache(source=folder)` reads:
    a copy to ship beside a model, so that loading it needs neither the mirror nor the internet."""
    cache = seed_bpe_cache()
    target = Path(folder) / "gpt2"
    target.mkdir(parents=True, exist_ok=True)
    for name, sha256 in BPE_FILES:
        cached = cache / hashlib.sha1((_BPE_BASE + name).encode()).hexdigest()
        fetch_url(cached.resolve().as_uri(), target / name, sha256, progress=False, label=f"GPT-2 BPE file {name}")
    return Path(folder)


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding (50257 tokens, <|endoftext|> = 50256), split by PRETOKENIZER."""
    seed_bpe_cache()
    return tiktoken.Encoding(**{**gpt2(), "pat_str": PRETOKENIZER})


def stock_tokenizer() -> tiktoken.Encoding:
    """tiktoken's own `gpt2` encoding, pattern and all: the reference get_tokenizer() is held to."""
    seed_bpe_cache()
    return tiktoken.get_encoding("gpt2")


def encode_with_end_of_text(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of `text`, where a literal "<|endoftext|>" is the end-of-text token (prompts)."""
    return tokenizer.encode(text, allowed_special={END_OF_TEXT})


def encode_literal(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of `text` with no special tokens: a literal "<|endoftext|>" is ordinary characters (data)."""
    return tokenizer.encode(text, disallowed_special=())
