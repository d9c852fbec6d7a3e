"""Instruction prompt formats (the book's chapter 7), shared by training, generation and the judge.

Keeping the one definition here means the text a model is fine-tuned on, the prompt it is asked
at generation time and the input the judge sees can never drift apart.

An entry is a mapping with "instruction", an optional "input" and (for training) "output".
"""

import typing
from collections.abc import Mapping, Sequence
from typing import Literal

from gpt_core.errors import GptflowError

Style = Literal["alpaca", "phi3"]
STYLES = typing.get_args(Style)

_ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
_RESPONSE_HEADERS = {"alpaca": "\n\n### Response:\n", "phi3": "\n<|assistant|>\n"}


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise GptflowError(f"unknown prompt style {style!r}: use one of {', '.join(STYLES)}")


def _field(entry: Mapping, key: str) -> str:
    try:
        return entry[key]
    except KeyError:
        raise GptflowError(
            f"instruction entry has no {key!r} field: each entry needs 'instruction', "
            f"'output' and optionally 'input' (got keys {sorted(entry)})"
        ) from None


def format_prompt(
    entry: Mapping, style: str = "alpaca", *, with_response_header: bool = True
) -> str:
    """The prompt a model answers; with_response_header=False is the book's `format_input`."""
    _check_style(style)
    instruction = _field(entry, "instruction")
    extra = entry.get("input") or ""
    if style == "alpaca":
        text = f"{_ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if extra:
            text += f"\n\n### Input:\n{extra}"
    else:
        text = f"<|user|>\n{instruction}"
        if extra:
            text += f"\n{extra}"
    return text + _RESPONSE_HEADERS[style] if with_response_header else text


def format_example(entry: Mapping, style: str = "alpaca") -> str:
    """The training text: prompt + output (the collate appends the end-of-text token)."""
    return format_prompt(entry, style) + _field(entry, "output")


def extract_response(generated_text: str, prompt: str, style: str = "alpaca") -> str:
    """The model's answer from a generation that echoes its prompt.

    Works whether `prompt` was built with or without the response header: whatever of the header
    is left after removing the prompt is stripped, as the book's `.replace("### Response:", "")`.
    """
    _check_style(style)
    text = generated_text[len(prompt):] if generated_text.startswith(prompt) else generated_text
    text = text.strip().removeprefix(_RESPONSE_HEADERS[style].strip())
    return text.strip()


def response_header(style: str) -> str:
    """What a prompt in `style` ends with, after which the model writes its answer."""
    _check_style(style)
    return _RESPONSE_HEADERS[style]


CHAT_ROLES = ("system", "user", "assistant")


def format_chat(messages: Sequence[Mapping], style: str | None) -> str:
    """A conversation as the prompt for the assistant's next turn.

    One user message gives exactly format_prompt({"instruction": content}, style), the prompt
    `gptflow ask` sends. Further turns repeat the style's instruction and response headers
    (alpaca: "### Instruction:" / "### Response:"; phi3: <|user|> / <|assistant|>). System
    messages replace alpaca's preamble, or open a phi3 prompt as a <|system|> turn. With
    style None (a base language model) the prompt is the messages' contents, one per line,
    for the model to continue.
    """
    for message in messages:
        if message.get("role") not in CHAT_ROLES or not isinstance(message.get("content"), str):
            raise GptflowError(
                "each chat message needs a role (system, user or assistant) and a text content, "
                f"got {dict(message)!r:.200}")
    if style is None:
        return "\n".join(m["content"] for m in messages)
    _check_style(style)
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[-1]["role"] != "user":
        raise GptflowError("a chat needs a user message last, for the model to answer")
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if style == "alpaca":
        text = system or _ALPACA_PREAMBLE
        headers = {"user": "\n\n### Instruction:\n", "assistant": _RESPONSE_HEADERS["alpaca"]}
        for turn in turns:
            text += headers[turn["role"]] + turn["content"]
    else:
        text = f"<|system|>\n{system}" if system else ""
        for turn in turns:
            if turn["role"] == "user":
                text += ("\n" if text else "") + f"<|user|>\n{turn['content']}"
            else:
                text += _RESPONSE_HEADERS["phi3"] + turn["content"]
    return text + _RESPONSE_HEADERS[style]
