"""GPT-2's byte-pair encoding through tiktoken, usable offline.

tiktoken downloads the two BPE files on first use and caches them under the SHA-1 of their
URL. Where the internet is out of reach we seed that cache ourselves, from GPTFLOW_MIRROR,
with the checksums tiktoken itself checks.
"""

import hashlib
import os
from pathlib import Path

import tiktoken

from .download import fetch_url, mirror_url
from .errors import GptflowError

END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256

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


def seed_bpe_cache() -> Path:
    """Put the BPE files where tiktoken looks for them; returns the cache folder."""
    cache = _cache_dir()
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(cache))
    mirror = os.environ.get("GPTFLOW_MIRROR")
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


def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's `gpt2` encoding: 50257 tokens, <|endoftext|> = 50256."""
    seed_bpe_cache()
    return tiktoken.get_encoding("gpt2")


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    return tokenizer.encode(text, allowed_special={END_OF_TEXT})
