"""The viewer's one error type: bad input, said in one line."""

from __future__ import annotations

__all__ = ["ViewerError"]


class ViewerError(ValueError):
    """A run folder the viewer cannot show (not a circuit run, an older format, a missing table).

    The message is one line: the CLI prints it after ``error:`` and exits 2.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # one line, whatever the caller built
