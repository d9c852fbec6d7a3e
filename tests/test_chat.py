"""`gptflow chat` fed through a pipe: answers as `gptflow ask` gives them, history, /reset, /quit."""

import io
import subprocess
import sys

import pytest
from serving import ROOT, save_tiny_instruct_model

from flows.chat import ChatSession, run_chat
from gpt_core.generate import generate
from gpt_core.prompts import extract_response, format_chat
from gpt_core.tokenizer import get_tokenizer
from gpt_core.weights import load_model

TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_instruct_model(tmp_path_factory.mktemp("chat") / "tiny")


def ask(model_dir, instruction):
    import contextlib

    from flows.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["ask", "--model", str(model_dir), "--max-new-tokens", str(TOKENS), instruction])
    return out.getvalue().removesuffix("\n")


def answer_after(model_dir, turns):
    """The greedy answer to the conversation `turns`, computed directly."""
    model, _ = load_model(model_dir)
    tokenizer = get_tokenizer()
    prompt = format_chat(turns, "alpaca")
    new = generate(model, [tokenizer.encode(prompt, disallowed_special=())], TOKENS)[0]
    return extract_response(tokenizer.decode(new), prompt, "alpaca")


def test_piped_conversation_with_reset_and_quit(model_dir):
    lines = ["Name a colour.", "What is 2+2?", "/reset", "What is 2+2?", "/quit", "Say hi"]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--model", str(model_dir),
                           "--max-new-tokens", str(TOKENS)], input="\n".join(lines) + "\n",
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    first, second, third = done.stdout.splitlines()  # nothing after /quit
    assert first == ask(model_dir, "Name a colour.")
    history = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What is 2+2?"}]
    assert second == answer_after(model_dir, history)  # the first exchange was in the prompt
    assert third == ask(model_dir, "What is 2+2?")  # /reset forgot it
    assert "(conversation forgotten)" in done.stderr and ">>>" not in done.stdout


def test_end_of_input_quits_and_unknown_commands_are_not_sent(model_dir):
    out, err = io.StringIO(), io.StringIO()
    run_chat(str(model_dir), max_new_tokens=TOKENS, stdin=io.StringIO("/help\n\nSay hi"), stdout=out, stderr=err)
    assert out.getvalue() == ask(model_dir, "Say hi") + "\n"
    assert "unknown command /help" in err.getvalue()


def test_answers_stream_in_pieces(model_dir):
    model, config = load_model(model_dir)
    session = ChatSession(model, get_tokenizer(), style=config["style"], max_new_tokens=TOKENS)
    pieces = list(session.reply("Name a colour."))
    assert len(pieces) > 1 and "".join(pieces) == ask(model_dir, "Name a colour.")
    assert session.history[-1] == {"role": "assistant", "content": "".join(pieces)}


def test_a_long_conversation_drops_its_oldest_exchanges(model_dir):
    model, config = load_model(model_dir)
    tokenizer = get_tokenizer()
    session = ChatSession(model, tokenizer, style="alpaca", max_new_tokens=TOKENS)
    for i in range(40):
        session.history += [{"role": "user", "content": f"question {i} " + "blah " * 20},
                            {"role": "assistant", "content": f"answer {i} " + "blah " * 20}]
    prompt = session.prompt("the last question")
    assert len(prompt) <= model.cfg.context_length - TOKENS
    text = tokenizer.decode(prompt)
    assert text.startswith("Below is an instruction") and "question 39" in text and "question 0 " not in text
    assert text.endswith("### Instruction:\nthe last question\n\n### Response:\n")
