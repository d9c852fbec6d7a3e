"""The exceptions a user is meant to read.

Anything raised as GptflowError is a problem with the user's input or environment
(a missing file, a bad option, an unreachable server); the CLI prints its message on one
line and exits non-zero without a traceback. So does an OSError that the machine, not the
code, causes (a full disk, a read-only or forbidden folder), wherever it is raised. Every
other exception is a bug.
"""

import errno


class GptflowError(Exception):
    """A problem the user can fix; the message says what and how."""


# What the machine does to a write, not a mistake in the code.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def user_message(exc: BaseException) -> str | None:
    """The one line to show for `exc` if it is the user's to fix, else None (a bug: show the traceback)."""
    if isinstance(exc, GptflowError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _ENVIRONMENT_ERRNOS:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    return None
