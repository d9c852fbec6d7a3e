import pytest

from gpt_core.errors import GptflowError
from gpt_core.prompts import (
    STYLES,
    extract_response,
    format_chat,
    format_example,
    format_prompt,
)

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
WITH_INPUT = {
    "instruction": "Identify the correct spelling of the following word.",
    "input": "Ocassion",
    "output": "The correct spelling is 'Occasion.'",
}
WITHOUT_INPUT = {
    "instruction": "What is an antonym of 'complicated'?",
    "input": "",
    "output": "An antonym of 'complicated' is 'simple'.",
}


def test_alpaca_with_input():
    assert format_prompt(WITH_INPUT) == (
        f"{PREAMBLE}\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion\n\n### Response:\n"
    )


def test_alpaca_without_input():
    assert format_prompt(WITHOUT_INPUT, "alpaca") == (
        f"{PREAMBLE}\n\n### Instruction:\nWhat is an antonym of 'complicated'?\n\n### Response:\n"
    )


def test_alpaca_example_is_the_books_training_text():
    # The book: format_input(entry) + f"\n\n### Response:\n{entry['output']}"
    book_format_input = (
        f"{PREAMBLE}\n\n### Instruction:\n{WITH_INPUT['instruction']}"
        f"\n\n### Input:\n{WITH_INPUT['input']}"
    )
    assert format_prompt(WITH_INPUT, with_response_header=False) == book_format_input
    assert format_example(WITH_INPUT) == (
        book_format_input + f"\n\n### Response:\n{WITH_INPUT['output']}"
    )


def test_missing_input_key_is_no_input():
    entry = {"instruction": "Say hi.", "output": "Hi."}
    assert format_prompt(entry) == f"{PREAMBLE}\n\n### Instruction:\nSay hi.\n\n### Response:\n"


def test_phi3_with_input():
    assert format_prompt(WITH_INPUT, "phi3") == (
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion\n<|assistant|>\n"
    )
    assert format_example(WITH_INPUT, "phi3").endswith(
        "<|assistant|>\nThe correct spelling is 'Occasion.'"
    )


def test_phi3_without_input():
    assert format_prompt(WITHOUT_INPUT, "phi3") == (
        "<|user|>\nWhat is an antonym of 'complicated'?\n<|assistant|>\n"
    )


def test_unknown_style_lists_the_styles():
    with pytest.raises(GptflowError, match="unknown prompt style 'chatml'") as info:
        format_prompt(WITH_INPUT, "chatml")
    for style in STYLES:
        assert style in str(info.value)


def test_missing_instruction_is_a_clear_error():
    with pytest.raises(GptflowError, match="'instruction'"):
        format_prompt({"output": "x"})


@pytest.mark.parametrize("style", STYLES)
def test_extract_response_from_echoed_generation(style):
    prompt = format_prompt(WITH_INPUT, style)
    assert extract_response(prompt + " Occasion.\n", prompt, style) == "Occasion."


def test_extract_response_with_the_books_headerless_prompt():
    prompt = format_prompt(WITH_INPUT, with_response_header=False)
    generated = prompt + "\n\n### Response:\nOccasion.  "
    assert extract_response(generated, prompt) == "Occasion."


@pytest.mark.parametrize("style", STYLES)
def test_one_user_message_is_the_ask_prompt(style):
    messages = [{"role": "user", "content": WITHOUT_INPUT["instruction"]}]
    assert format_chat(messages, style) == format_prompt({"instruction": WITHOUT_INPUT["instruction"]}, style)


def test_chat_turns_repeat_the_styles_headers():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    assert format_chat(messages, "alpaca") == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello."
        "\n\n### Instruction:\nCapital of France?\n\n### Response:\n")
    assert format_chat(messages, "phi3") == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.\n<|user|>\nCapital of France?\n<|assistant|>\n")
    assert format_chat(messages, None) == "Be brief.\nHi\nHello.\nCapital of France?"


@pytest.mark.parametrize("messages, message", [
    ([], "user message last"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "user message last"),
    ([{"role": "tool", "content": "42"}], "role"),
    ([{"role": "user", "content": None}], "text content"),
])
def test_bad_chats_fail(messages, message):
    with pytest.raises(GptflowError, match=message):
        format_chat(messages, "alpaca")
