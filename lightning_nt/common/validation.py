"""Declarative argument checks: every constructor argument checked for type, finiteness and range at construction.

A capability's ``__init__`` carries type annotations anyway (LightningCLI builds its parser from them).
:func:`checked_arguments` reads those annotations and checks every argument against them, strictly:
``bool`` accepts only ``True``/``False`` (the string ``"no"`` is truthy and must not slip through), ``int``
refuses booleans and non-integers, ``float`` refuses booleans, NaN and infinities, ``Literal`` lists its
values, ``Callable`` asks for something callable, and sequences are checked element by element. Range rules
(:func:`at_least`, :func:`above`, :func:`between`, ...) are declared next to the signature, so the constraints
of a class can be read in one place. Every failure is an :class:`ArgumentError` naming the argument, what it
may be and what it got; it is both a ``ValueError`` and a ``TypeError``, so either ``except`` catches it.

An argument renamed in a release keeps its old name for one more release through :func:`renamed_arguments`,
declared under :func:`checked_arguments`: the old name stays in the signature (so LightningCLI YAML configs with
the old key keep working), is checked like the new one, warns and passes its value on under the new name. A
renamed class or function keeps its old name in its module through :func:`renamed_attributes`.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import math
import numbers
import types
import typing
import warnings
from collections.abc import Callable, Collection
from typing import Any, Literal, TypeVar, Union

from lightning_fabric.utilities.rank_zero import LightningDeprecationWarning

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
    "renamed_arguments",
    "renamed_attributes",
    "renamed_property",
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
        renamed: dict[str, str] = getattr(function, _RENAMED, {})
        all_rules = {**rules, **{old: rules[new] for old, new in renamed.items() if new in rules}}
        hints: dict[str, Any] | None = None

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal hints
            if hints is None:  # resolved on first call: annotations may name classes defined after the function
                hints = typing.get_type_hints(function)
                hints.update({old: hints.get(new, Any) | None for old, new in renamed.items()})
            # with an old name, the new one may be missing here: the renaming wrapper below supplies it
            bound = (signature.bind_partial if renamed else signature.bind)(*args, **kwargs)
            bound.apply_defaults()
            for name, value in bound.arguments.items():
                parameter = signature.parameters[name]
                if name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                    continue
                extra = all_rules.get(name, ())
                check_argument(name, value, hints.get(name, Any), *(extra if isinstance(extra, tuple) else (extra,)))
            return function(*args, **kwargs)

        setattr(wrapper, _CHECKED, True)
        return typing.cast(F, wrapper)

    return decorate


def renamed_arguments(**renames: str) -> Callable[[F], F]:
    """Keep the old names of renamed arguments for one release: ``renamed_arguments(old="new", ...)``.

    The old name joins the signature as a keyword-only argument defaulting to ``None`` (LightningCLI reads the
    signature, so a YAML config with the old key still parses). Passing it warns with Lightning's
    ``LightningDeprecationWarning`` (a ``DeprecationWarning`` that Python shows by default) naming the new name and
    behaves exactly as passing the new name; passing both is an :class:`ArgumentError`.
    LightningCLI passes every argument, the unset ones at their defaults, so the new name counts as given only
    when it differs from its default. Declare it *under* :func:`checked_arguments`, which then checks the old
    name with the new name's type and rules, and names the old name in its errors.

    Examples:
        >>> import warnings
        >>> class Monitor:
        ...     @checked_arguments(num_examples=at_least(1))
        ...     @renamed_arguments(num_samples="num_examples")
        ...     def __init__(self, num_examples: int = 8) -> None:
        ...         self.num_examples = num_examples
        >>> list(inspect.signature(Monitor).parameters)
        ['num_examples', 'num_samples']
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     Monitor(num_samples=4).num_examples
        4
        >>> str(caught[0].message)
        '`num_samples` is deprecated and will be removed in the next release: pass `num_examples` instead.'
        >>> Monitor(num_examples=2, num_samples=4)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_nt.common.validation.ArgumentError: `num_samples` is the deprecated name of `num_examples`: ...
    """

    def decorate(function: F) -> F:
        if getattr(function, _CHECKED, False):
            raise TypeError(f"Declare renamed_arguments under checked_arguments on {function.__qualname__}.")
        signature = inspect.signature(function)
        for old, new in renames.items():
            if new not in signature.parameters or old in signature.parameters:
                raise TypeError(f"{function.__qualname__} must take `{new}` and not `{old}` to rename `{old}`.")

        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                value = kwargs.pop(old, None)
                if value is None:
                    continue
                given = signature.bind_partial(*args, **kwargs).arguments
                if new in given and not _same(given[new], signature.parameters[new].default):
                    raise ArgumentError(
                        f"`{old}` is the deprecated name of `{new}`: pass only `{new}` (got {old}={value!r}, "
                        f"{new}={given[new]!r})."
                    )
                warnings.warn(
                    f"`{old}` is deprecated and will be removed in the next release: pass `{new}` instead.",
                    LightningDeprecationWarning,
                    stacklevel=_caller_level(),
                )
                kwargs[new] = value
            return function(*args, **kwargs)

        wrapper.__signature__ = _with_old_names(signature, renames)  # type: ignore[attr-defined]
        setattr(wrapper, _RENAMED, dict(renames))
        return typing.cast(F, wrapper)

    return decorate


def renamed_attributes(namespace: dict[str, Any], **renames: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving the old names of renamed objects, for one release, with a warning.

    ``namespace`` is the module's ``globals()``; ``renames`` maps each old name to the new one. Importing or
    reading an old name warns with Lightning's ``LightningDeprecationWarning`` (a ``DeprecationWarning`` that Python
    shows by default) naming the new one and gives the very same object (so ``isinstance`` holds either way); any
    other missing name is an ``AttributeError`` as usual.

    Examples:
        >>> import types, warnings
        >>> module = types.ModuleType("shapes")
        >>> module.Circle = type("Circle", (), {})
        >>> module.__getattr__ = renamed_attributes(vars(module), Round="Circle")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     module.Round is module.Circle
        True
        >>> str(caught[0].message)
        '`shapes.Round` is deprecated and will be removed in the next release: use `shapes.Circle` instead.'
    """

    def __getattr__(name: str) -> Any:
        module = namespace["__name__"]
        if name not in renames:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        warnings.warn(
            f"`{module}.{name}` is deprecated and will be removed in the next release: use "
            f"`{module}.{renames[name]}` instead.",
            LightningDeprecationWarning,
            stacklevel=2,
        )
        return namespace[renames[name]]

    return __getattr__


_CHECKED, _RENAMED = "__checks_arguments__", "__renamed_arguments__"


def _with_old_names(signature: inspect.Signature, renames: dict[str, str]) -> inspect.Signature:
    """``signature`` with each old name added as a keyword-only argument, ``None`` by default, before ``**kwargs``."""
    parameters = list(signature.parameters.values())
    end = next((i for i, p in enumerate(parameters) if p.kind is p.VAR_KEYWORD), len(parameters))
    old = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_optional(signature, new))
        for name, new in renames.items()
    ]
    return signature.replace(parameters=[*parameters[:end], *old, *parameters[end:]])


def _optional(signature: inspect.Signature, name: str) -> Any:
    """The annotation of argument ``name``, ``None`` allowed (a string under postponed annotations)."""
    annotation = signature.parameters[name].annotation
    if annotation is inspect.Parameter.empty:
        return Any
    if isinstance(annotation, str):
        return annotation if "None" in annotation.split(" | ") else f"{annotation} | None"
    return annotation | None


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the line calling the outermost argument-checking wrapper."""
    frame, level = inspect.currentframe(), 0
    while frame is not None and frame.f_code.co_filename == __file__:
        frame, level = frame.f_back, level + 1
    return level


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


def renamed_property(old: str, new: str) -> property:
    """A class attribute keeping the old name of a renamed instance attribute for one release, with a warning.

    Examples:
        >>> import warnings
        >>> class Probe:
        ...     num_samples = renamed_property("num_samples", "num_examples")
        ...     def __init__(self) -> None:
        ...         self.num_examples = 8
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     Probe().num_samples
        8
        >>> str(caught[0].message)
        '`Probe.num_samples` is deprecated and will be removed in the next release: use `Probe.num_examples` instead.'
    """

    def read(instance: Any) -> Any:
        owner = type(instance).__name__
        warnings.warn(
            f"`{owner}.{old}` is deprecated and will be removed in the next release: use `{owner}.{new}` instead.",
            LightningDeprecationWarning,
            stacklevel=2,
        )
        return getattr(instance, new)

    return property(read, doc=f"Deprecated name of ``{new}``.")
