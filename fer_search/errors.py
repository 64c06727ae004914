"""The one exception type for a user's mistake: the CLI prints it on one line and exits 2."""


class UserError(Exception):
    """Bad input, configuration or state that the user can fix; the message says what to fix."""
