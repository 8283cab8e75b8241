"""Bad values for a constructor argument, derived from its type annotation (strings for numbers, non-integers,
NaN, infinities, strings for booleans, non-callables, ...), and the sweep that tries them all."""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from typing import Any, Literal, Union

from lightning_nt.common.validation import ArgumentError
from tests.contract.capabilities import Constructor

__all__ = ["bad_values", "sweep", "swept_arguments"]

_NAN, _INF = math.nan, math.inf


def bad_values(annotation: Any) -> list[Any]:
    """Values that an argument annotated ``annotation`` must refuse (``None`` only where it isn't allowed)."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        options = [option for option in arguments if option is not type(None)]
        allowed_none = len(options) < len(arguments)
        values = [value for option in options for value in bad_values(option)]
        fits_an_option = [value for value in values if any(_fits(value, option) for option in options)]
        return _unique(v for v in values if v not in fits_an_option and not (allowed_none and v is None))
    if origin is Literal:
        return ["not-a-choice", None, 1.5]
    if annotation is bool:
        return ["no", "False", 1, 0, None]
    if annotation is int:
        return ["3", 2.5, _NAN, _INF, True, None]
    if annotation is float:
        return ["0.5", _NAN, _INF, -_INF, True, None]
    if annotation is str:
        return [3, None]
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return ["loss", 3, None]
    if origin in (collections.abc.Sequence, list, tuple):
        element = arguments[0] if arguments else Any
        return [3, None, "12", *([[value] for value in bad_values(element) if value is not None][:4])]
    return []


def _fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of ``annotation``'s type in the loose sense (an int where a float is allowed)."""
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return False


def _unique(values: Any) -> list[Any]:
    seen: list[Any] = []
    for value in values:
        if not any(value is other or (type(value) is type(other) and value == other) for other in seen):
            seen.append(value)
    return seen


def swept_arguments(cls: type) -> list[str]:
    """The constructor arguments a sweep covers: every named argument (``*args``/``**kwargs`` aside)."""
    signature = inspect.signature(cls.__init__)
    return [
        name
        for name, parameter in signature.parameters.items()
        if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ]


def sweep(constructor: Constructor, name: str) -> list[str]:
    """Try every bad value of argument ``name``; one line per value that was silently accepted or refused
    obscurely (not an :class:`ArgumentError`, or a message that doesn't name the argument)."""
    hints = typing.get_type_hints(inspect.unwrap(constructor.cls.__init__))
    values = [*bad_values(hints.get(name, Any)), *constructor.out_of_range.get(name, ())]
    problems = []
    for value in values:
        arguments = {**constructor.valid, name: value}
        try:
            constructor.cls(**arguments)
        except ArgumentError as error:
            if f"`{name}`" not in str(error) and name not in str(error):
                problems.append(f"{name}={value!r}: ArgumentError not naming `{name}`: {error}")
        except Exception as error:  # any other error is the obscure kind the sweep reports
            problems.append(f"{name}={value!r}: obscure {type(error).__name__}: {error}")
        else:
            problems.append(f"{name}={value!r}: silently accepted")
    return problems
