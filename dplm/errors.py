"""The one exception type that carries a user-facing, one-line message."""


class DplmError(Exception):
    """Bad input or settings: the message names what is wrong and how to fix it."""
