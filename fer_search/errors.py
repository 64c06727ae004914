"""How fer-search speaks to its user: the exception for a user's mistake (one line, exit 2), one-line
errors, and its log lines."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# Timestamped: a log that goes to a file or `docker compose logs` must say when each trial ended.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# fer-search's own log level by -q / -v: warnings only; a line per trial (the default); and every epoch.
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class UserError(Exception):
    """Bad input, configuration or state that the user can fix; the message says what to fix."""


class Crashed(Exception):
    """A failure whose traceback is already on stderr (a child process's): the CLI tells it in one line, exit 1."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none): errors are told in one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def configure_logging(level: int = logging.INFO) -> None:
    """Every library's warnings, and fer-search's own lines at `level` (a line per trial at INFO), on stderr."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
        root.addHandler(handler)
    logging.getLogger("fer_search").setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is when a line is logged, not as it was at set-up: click's test runner,
    like any caller that redirects stderr, swaps it for the length of a command."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass  # StreamHandler's constructor sets it


def log_level() -> int:
    """fer-search's log level now: handed to the processes it starts, which configure their own logging."""
    return logging.getLogger("fer_search").level or logging.INFO


class LineHandler(logging.Handler):
    """Hands fer-search's log lines to a function instead of the terminal: to the live progress
    display, which must print them above its lines lest its next redraw erase them, or from a
    local worker process to its parent, which owns that display."""

    def __init__(self, send: Callable[[str], None]) -> None:
        super().__init__()
        self.send = send
        self.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))

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
