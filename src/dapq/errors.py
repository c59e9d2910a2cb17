"""Errors raised by dapq. Every message says what went wrong and what to do about it."""


class DapqError(ValueError):
    """A user-facing error: bad input, a missing model file, an unsupported model."""
