"""Argument checks that name the argument and what it may be, shared by every capability."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

__all__ = ["check_choice"]


def check_choice(name: str, value: Any, allowed: Collection[Any]) -> None:
    """Raise ``ValueError`` naming ``name`` and the allowed values if ``value`` is not one of them.

    Example:
        >>> check_choice("mode", "ema", ("uniform", "ema"))
        >>> check_choice("mode", "swa", ("uniform", "ema"))
        Traceback (most recent call last):
        ...
        ValueError: `mode` must be one of ('uniform', 'ema'), got 'swa'.
    """
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")
