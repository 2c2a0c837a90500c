"""The one exception type that reaches the user as a one-line message instead of a traceback."""


class FmdistError(Exception):
    """A problem with the user's input or environment: printed as one line by rank 0, exit code 2."""

    exit_code = 2
