"""User-facing errors: one actionable line, no traceback."""


class ImgsimError(Exception):
    """An error whose message tells the user what to do; the CLI prints it as one line."""
