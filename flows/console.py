"""What a failed flow shows on the terminal: our own errors as one line.

Prefect logs an exception that ends a task or flow run with its traceback, once per enclosing
run, and then reports the final state with the message again. For a GptflowError (input or
environment the user can fix) the CLI prints that message once, so those console records are
dropped (so are those of a full disk or a read-only folder); Prefect's API handler still sends them to the Prefect UI, and `--verbose` keeps them.
"""

import logging

from gpt_core.errors import GptflowError, user_message


class _UserErrorFilter(logging.Filter):
    def __init__(self):
        super().__init__()
        self.hid_a_traceback = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and user_message(record.exc_info[1]) is not None:
            self.hid_a_traceback = True
            return False
        # The final state's line repeats the message: "Finished in state Failed('... GptflowError: ...')".
        message = record.getMessage()
        return not (message.startswith("Finished in state Failed")
                    and (f"{GptflowError.__name__}:" in message or self.hid_a_traceback))


def quiet_user_errors() -> None:
    """Drop Prefect's console echo of our own errors (after Prefect has configured its logging)."""
    import prefect.main  # noqa: F401  (importing it sets up Prefect's logging)
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logger for logger in logging.Logger.manager.loggerDict.values()
                                       if isinstance(logger, logging.Logger)]
    # Prefect's own console handler where it installed one, else the CLI's on the root logger.
    for logger in loggers:
        for handler in logger.handlers:
            console = isinstance(handler, PrefectConsoleHandler) or (
                logger is logging.getLogger() and isinstance(handler, logging.StreamHandler))
            if console and not any(
                    isinstance(f, _UserErrorFilter) for f in handler.filters):
                handler.addFilter(_UserErrorFilter())


_SERVER_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


def prefect_start_message(exc: BaseException) -> str | None:
    """One line for a temporary Prefect server that did not come up in time, else None."""
    if not (isinstance(exc, RuntimeError) and str(exc).startswith(_SERVER_TIMEOUT)):
        return None
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout,
    )
    return (f"the temporary Prefect server did not answer within {timeout.value()} s (a busy machine?): "
            f"raise {timeout.name}, or start one with `prefect server start` and set PREFECT_API_URL "
            "so every command reuses it")
