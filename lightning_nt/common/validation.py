"""Declarative argument checks: every constructor argument checked for type, finiteness and range at construction.

A capability's ``__init__`` carries type annotations anyway (LightningCLI builds its parser from them).
:func:`checked_arguments` reads those annotations and checks every argument against them, strictly:
``bool`` accepts only ``True``/``False`` (the string ``"no"`` is truthy and must not slip through), ``int``
refuses booleans and non-integers, ``float`` refuses booleans, NaN and infinities, ``Literal`` lists its
values, ``Callable`` asks for something callable, and sequences are checked element by element. Range rules
(:func:`at_least`, :func:`above`, :func:`between`, ...) are declared next to the signature, so the constraints
of a class can be read in one place. Every failure is an :class:`ArgumentError` naming the argument, what it
may be and what it got; it is both a ``ValueError`` and a ``TypeError``, so either ``except`` catches it.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Collection
from typing import Any, Literal, TypeVar, Union

__all__ = [
    "ArgumentError",
    "Rule",
    "above",
    "at_least",
    "at_most",
    "below",
    "between",
    "check_argument",
    "check_choice",
    "checked_arguments",
    "non_empty",
]

F = TypeVar("F", bound=Callable[..., Any])


class ArgumentError(ValueError, TypeError):
    """A bad argument: the message names it, says what it may be and what it was."""


class Rule:
    """A constraint on an argument's value beyond its type: ``predicate(value)`` must hold.

    ``description`` completes the sentence "`name` must be ...". Rules apply to each element of a sequence
    argument, and are skipped for ``None`` where the annotation allows ``None``.
    """

    def __init__(self, predicate: Callable[[Any], bool], description: str) -> None:
        self.predicate = predicate
        self.description = description

    def check(self, name: str, value: Any) -> None:
        values = value if _is_sequence(value) else (value,)
        for item in values:
            if not self.predicate(item):
                shown = f"{value!r}" if item is value else f"{value!r} (element {item!r})"
                raise ArgumentError(f"`{name}` must be {self.description}, got {shown}.")


def at_least(bound: float) -> Rule:
    """``value >= bound``."""
    return Rule(lambda value: value >= bound, f">= {bound}")


def above(bound: float) -> Rule:
    """``value > bound``."""
    return Rule(lambda value: value > bound, f"> {bound}")


def at_most(bound: float) -> Rule:
    """``value <= bound``."""
    return Rule(lambda value: value <= bound, f"<= {bound}")


def below(bound: float) -> Rule:
    """``value < bound``."""
    return Rule(lambda value: value < bound, f"< {bound}")


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """``low <= value <= high``, with either end excluded on request (``(0, 1)`` is ``low_open=high_open=True``)."""

    def inside(value: Any) -> bool:
        return (value > low if low_open else value >= low) and (value < high if high_open else value <= high)

    brackets = ("(" if low_open else "[", ")" if high_open else "]")
    return Rule(inside, f"in {brackets[0]}{low}, {high}{brackets[1]}")


def non_empty() -> Rule:
    """A sequence with at least one element (checked on the whole sequence)."""
    return _WholeRule(lambda value: len(value) > 0, "non-empty")


class _WholeRule(Rule):
    def check(self, name: str, value: Any) -> None:
        if not self.predicate(value):
            raise ArgumentError(f"`{name}` must be {self.description}, got {value!r}.")


def check_choice(name: str, value: Any, allowed: Collection[Any]) -> None:
    """Raise :class:`ArgumentError` naming ``name`` and the allowed values if ``value`` is not one of them.

    Examples:
        >>> check_choice("mode", "ema", ("uniform", "ema"))
        >>> check_choice("mode", "swa", ("uniform", "ema"))
        Traceback (most recent call last):
        ...
        lightning_nt.common.validation.ArgumentError: `mode` must be one of ('uniform', 'ema'), got 'swa'.
    """
    if not any(_same(value, choice) for choice in allowed):
        raise ArgumentError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}.")


def check_argument(name: str, value: Any, annotation: Any, *rules: Rule) -> None:
    """Check ``value`` against a type ``annotation`` and ``rules``; raise :class:`ArgumentError` naming ``name``.

    Examples:
        >>> check_argument("every_n_steps", 5, int, at_least(1))
        >>> check_argument("every_n_steps", float("nan"), int, at_least(1))
        Traceback (most recent call last):
        ...
        lightning_nt.common.validation.ArgumentError: `every_n_steps` must be an integer, got nan.
        >>> check_argument("tol", 2.0, float, between(0, 1, low_open=True, high_open=True))
        Traceback (most recent call last):
        ...
        lightning_nt.common.validation.ArgumentError: `tol` must be in (0, 1), got 2.0.
    """
    problem = _type_problem(value, annotation)
    if problem is not None:
        raise ArgumentError(f"`{name}` must be {problem}, got {value!r}.")
    if value is None:
        return
    for rule in rules:
        rule.check(name, value)


def checked_arguments(**rules: Rule | tuple[Rule, ...]) -> Callable[[F], F]:
    """Decorate an ``__init__`` (or any function): check every argument against its annotation and ``rules``.

    The signature seen by ``inspect`` (and so by LightningCLI) is the function's own.

    Examples:
        >>> class Monitor:
        ...     @checked_arguments(every_n_steps=at_least(1))
        ...     def __init__(self, every_n_steps: int = 10, verbose: bool = False) -> None:
        ...         self.every_n_steps = every_n_steps
        >>> Monitor(every_n_steps=0)
        Traceback (most recent call last):
        ...
        lightning_nt.common.validation.ArgumentError: `every_n_steps` must be >= 1, got 0.
        >>> Monitor(verbose="no")
        Traceback (most recent call last):
        ...
        lightning_nt.common.validation.ArgumentError: `verbose` must be True or False, got 'no'.
    """

    def decorate(function: F) -> F:
        signature = inspect.signature(function)
        unknown = set(rules) - set(signature.parameters)
        if unknown:
            raise TypeError(f"Rules for arguments {sorted(unknown)} that {function.__qualname__} does not take.")
        hints: dict[str, Any] | None = None

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal hints
            if hints is None:  # resolved on first call: annotations may name classes defined after the function
                hints = typing.get_type_hints(function)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            for name, value in bound.arguments.items():
                parameter = signature.parameters[name]
                if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                    continue
                extra = rules.get(name, ())
                check_argument(name, value, hints.get(name, Any), *(extra if isinstance(extra, tuple) else (extra,)))
            return function(*args, **kwargs)

        return typing.cast(F, wrapper)

    return decorate


def _same(value: Any, choice: Any) -> bool:
    """Equality that doesn't let ``True == 1`` or ``1.0 == 1`` pass for a Literal choice of another type."""
    return type(value) is type(choice) and value == choice


def _is_sequence(value: Any) -> bool:
    return isinstance(value, collections.abc.Sequence) and not isinstance(value, str | bytes)


def _type_problem(value: Any, annotation: Any) -> str | None:
    """``None`` if ``value`` fits ``annotation``, else what it must be ("a finite number", "one of (...)")."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin is Union or origin is types.UnionType:
        problems = [_type_problem(value, option) for option in arguments]
        if any(problem is None for problem in problems):
            return None
        return " or ".join(dict.fromkeys(problem for problem in problems if problem))
    if annotation is None or annotation is type(None):
        return None if value is None else "None"
    if origin is Literal:
        return None if any(_same(value, choice) for choice in arguments) else f"one of {arguments}"
    if annotation is bool:
        return None if isinstance(value, bool) else "True or False"
    if annotation is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return None
        return "a finite number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if origin is collections.abc.Callable or annotation is collections.abc.Callable:
        return None if callable(value) else "callable"
    if origin in (collections.abc.Sequence, list, tuple):
        if not _is_sequence(value):
            return "a sequence (list or tuple)"
        element = arguments[0] if arguments else Any
        for item in value:
            problem = _type_problem(item, element)
            if problem is not None:
                return f"a sequence whose elements are {problem}"
        return None
    if origin in (dict, collections.abc.Mapping):
        return None if isinstance(value, collections.abc.Mapping) else "a mapping"
    if isinstance(annotation, type):
        return None if isinstance(value, annotation) else f"a {annotation.__name__}"
    return None
