"""Errors the command line turns into one clear line and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user (unknown name, missing folder, bad value): one line, no traceback."""
