"""`gptflow chat`: talk to a model in the terminal, each answer printed as it is generated.

The conversation is rendered in the model's prompt style (gpt_core.prompts.format_chat), so the
first answer equals `gptflow ask`'s for the same instruction; a base model (no style) continues
the conversation's text. When the conversation outgrows the context the oldest exchanges are
dropped, then (as ask does) the prompt's beginning.

Commands: /reset forgets the conversation, /quit (or /bye, or end of input) leaves. Ctrl-C stops
an answer being generated; at the prompt it leaves. Answers go to stdout, everything else to
stderr, so `gptflow chat --model M < questions.txt > answers.txt` keeps one answer per line
(an answer's own line breaks aside).
"""

import sys
from collections.abc import Iterator

from gpt_core.compiled import Compile, should_compile_decoding
from gpt_core.generate import Sampling, TokenStream
from gpt_core.streaming import TextStream
from gpt_core.tokenizer import END_OF_TEXT_ID

HELP = "/reset forgets the conversation, /quit leaves (so does Ctrl-D); Ctrl-C stops an answer"


class ChatSession:
    def __init__(self, model, tokenizer, *, style: str | None, system: str | None = None,
                 max_new_tokens: int = 256, sampling: Sampling = Sampling(), compiled: bool = False):
        self.model, self.tokenizer, self.style = model, tokenizer, style
        self.system, self.max_new_tokens, self.sampling = system, max_new_tokens, sampling
        self.compiled = compiled
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def _encode(self, messages) -> list[int]:
        from gpt_core.prompts import format_chat
        system = [{"role": "system", "content": self.system}] if self.system else []
        return self.tokenizer.encode(format_chat(system + messages, self.style), disallowed_special=())

    def prompt(self, text: str) -> list[int]:
        """The token ids the model is given for `text` after the conversation so far."""
        context = self.model.cfg.context_length
        # As generate_responses: room for the answer, but never less than half the context.
        budget = context - min(self.max_new_tokens, context // 2)
        turns = self.history + [{"role": "user", "content": text}]
        ids = self._encode(turns)
        while len(ids) > budget and len(turns) > 1:
            turns = turns[2:] if len(turns) > 2 else turns[1:]  # the oldest question and its answer
            ids = self._encode(turns)
        return ids[-budget:] or [END_OF_TEXT_ID]

    def reply(self, text: str) -> Iterator[str]:
        """The answer to `text`, piece by piece; the exchange joins the history once it is complete
        (or, interrupted, with what was said so far)."""
        stream = TokenStream(self.model, [self.prompt(text)], self.max_new_tokens, sampling=self.sampling,
                             stop_id=END_OF_TEXT_ID, compiled=self.compiled)
        out = TextStream(self.tokenizer, style=self.style)
        said = []
        try:
            for (token,) in stream:
                if token is None:
                    break
                if piece := out.feed(token):
                    said.append(piece)
                    yield piece
            if piece := out.finish():
                said.append(piece)
                yield piece
        finally:
            stream.close()
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(said)}]


def run_chat(spec: str, *, style: str | None = None, system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, compile: Compile = "auto", stdin=None, stdout=None,
             stderr=None) -> None:
    from gpt_core.tokenizer import get_tokenizer
    from gpt_core.weights import load_language_model

    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    sampling = Sampling(temperature, top_k, top_p, seed)
    model, config, folder = load_language_model(spec)
    style = style or config.get("style")
    session = ChatSession(model, get_tokenizer(), style=style, system=system, max_new_tokens=max_new_tokens,
                          sampling=sampling, compiled=should_compile_decoding(compile, model.tok_emb.weight.device))
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"gptflow chat with {folder} ({f'{style} prompts' if style else 'plain text completion'}). "
              f"{HELP}.", file=stderr)

    while True:
        try:
            line = input(">>> ") if interactive else stdin.readline()
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print(file=stderr)
            return
        if not interactive and not line:
            return  # end of input
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/bye", "/exit"):
            return
        if text == "/reset":
            session.reset()
            print("(conversation forgotten)", file=stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}: {HELP}", file=stderr)
            continue
        try:
            for piece in session.reply(text):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            print("\n(answer stopped)", file=stderr)
        stdout.write("\n")
        stdout.flush()
