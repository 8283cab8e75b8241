"""Errors raised deep inside PyTorch or Opacus, raised again with their cause and fix in the user's terms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["explained_errors"]


@contextmanager
def explained_errors(matches: Callable[[str], bool], explanation: Callable[[RuntimeError], str]) -> Iterator[None]:
    """Raise a ``RuntimeError`` from the block whose message ``matches`` again as a ``RuntimeError`` saying
    ``explanation(error)``, chained to it (``raise ... from error``); every other error passes unchanged.

    Examples:
        >>> with explained_errors(lambda text: "setup_context" in text, lambda error: f"Why, and the fix ({error})."):
        ...     raise RuntimeError("needs setup_context")
        Traceback (most recent call last):
        RuntimeError: Why, and the fix (needs setup_context).
    """
    try:
        yield
    except RuntimeError as error:
        if not matches(str(error)):
            raise
        raise RuntimeError(explanation(error)) from error
