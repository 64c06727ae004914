"""How fer-search speaks to its user: the exception for a user's mistake (one line, exit 2), one-line
errors, and its log lines."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


class UserError(Exception):
    """Bad input, configuration or state that the user can fix; the message says what to fix."""


class Crashed(Exception):
    """A failure whose traceback is already on stderr (a child process's): the CLI tells it in one line, exit 1."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none): errors are told in one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def configure_logging() -> None:
    """Every library's warnings, and fer-search's own notes (resumed trials, retries), on stderr."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("fer_search").setLevel(logging.INFO)


class LineHandler(logging.Handler):
    """Hands fer-search's log lines to a function instead of the terminal: to the live progress
    display, which must print them above its lines lest its next redraw erase them, or from a
    local worker process to its parent, which owns that display."""

    def __init__(self, send: Callable[[str], None]) -> None:
        super().__init__()
        self.send = send
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(self.format(record))
        except Exception:
            self.handleError(record)


@contextmanager
def logging_to(send: Callable[[str], None] | None) -> Iterator[None]:
    """While inside, fer-search's log lines go to `send` (see LineHandler), not the terminal; None: unchanged."""
    if send is None:
        yield
        return
    logger, handler = logging.getLogger("fer_search"), LineHandler(send)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
