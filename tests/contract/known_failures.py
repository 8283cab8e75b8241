"""The one table of contract-suite combinations known to fail on ``main``, each marked strict ``xfail``.

Rows are ``(capability, entries, promise, reason)``: ``entries`` is a zoo entry name (or, for the
``bad_input`` promise, a constructor argument), or a tuple of them. Strict xfail turns a row's test red the
moment its fix lands ("XPASS(strict)"), so the row must then be deleted: this table only ever shrinks.
"""

from __future__ import annotations

import pytest

__all__ = ["KNOWN_FAILURES", "known_failure", "unmatched_rows"]

Row = tuple[str, str | tuple[str, ...], str, str]

KNOWN_FAILURES: list[Row] = []  # empty: every capability keeps every promise on every shape of the zoo


_LOOKED_UP: set[tuple[str, str, str]] = set()


def known_failure(capability: str, entry: str, promise: str) -> list[pytest.MarkDecorator]:
    """The strict xfail mark of ``(capability, entry, promise)`` if the table lists it, else no mark."""
    _LOOKED_UP.add((capability, entry, promise))
    for row_capability, entries, row_promise, reason in KNOWN_FAILURES:
        names = (entries,) if isinstance(entries, str) else entries
        if row_capability == capability and row_promise == promise and entry in names:
            return [pytest.mark.xfail(strict=True, reason=reason)]
    return []


def unmatched_rows() -> list[tuple[str, str, str]]:
    """Table entries that name no test case (a typo, or a case that no longer exists): they would mark nothing."""
    return [
        (capability, entry, promise)
        for capability, entries, promise, _ in KNOWN_FAILURES
        for entry in ((entries,) if isinstance(entries, str) else entries)
        if (capability, entry, promise) not in _LOOKED_UP
    ]
