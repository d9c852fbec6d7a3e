"""Progress of long work: a tqdm bar on a terminal, plain periodic lines everywhere else.

A bar redraws itself with carriage returns, which a log file, CI output or the Prefect UI show as
one garbled line. Off a terminal the same facts go to the `gptflow` logger as a line every
`every_s` seconds and one at the end, so Prefect (which collects that logger) and log files read
them as they would any other message.
"""

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("gptflow")


class Progress:
    """update(n) as work is done, note(text) for a short status such as the loss, close() at the end."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, initial: int = 0,
                 enabled: bool = True, unit_scale: bool = False, every_s: float = 30.0, stream=None):
        stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self._start, self._every, self._unit_scale = initial, every_s, unit_scale
        self._note = ""
        self._enabled = enabled
        self._last = time.monotonic()
        isatty = getattr(stream, "isatty", None)
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                         file=stream, leave=False) if enabled and isatty is not None and isatty() else None

    def update(self, n: int = 1):
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and time.monotonic() - self._last >= self._every:
            self._line()

    def note(self, text: str):
        self._note = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def close(self):
        if self._bar is not None:
            self._bar.close()
        elif self._enabled and self.n > self._start:
            self._line()
        self._enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _line(self):
        self._last = time.monotonic()
        done = tqdm.format_sizeof(self.n) if self._unit_scale else str(self.n)
        if self.total:
            total = tqdm.format_sizeof(self.total) if self._unit_scale else str(self.total)
            done = f"{done}/{total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done = f"{done} {self.unit}"
        log.info("%s: %s%s", self.desc, done, f", {self._note}" if self._note else "")
