"""The exception for a user's mistake (one line, exit 2) and errors told in one line."""


class UserError(Exception):
    """Bad input, configuration or state that the user can fix; the message says what to fix."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none): errors are told in one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
