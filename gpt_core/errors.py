"""The one exception type a user is meant to read.

Anything raised as GptflowError is a problem with the user's input or environment
(a missing file, a bad option, an unreachable server); the CLI prints its message on one
line and exits non-zero without a traceback. Every other exception is a bug.
"""


class GptflowError(Exception):
    """A problem the user can fix; the message says what and how."""
