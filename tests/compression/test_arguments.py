"""Every constructor argument of the compression capability, swept with bad values: each must be refused at
construction with an ArgumentError naming the argument (no silent acceptance, no obscure error)."""

import collections.abc
import math
import typing
from typing import Any, Literal

import pytest
import torch
from torch import nn

from lightning_nt import CompressionBoundReporter, SubspaceTraining
from lightning_nt.common.validation import ArgumentError
from lightning_nt.compression import QuantizationConfig, RandomSubspace, configuration_grid, to_subspace

NOT_A_NUMBER = ["3", None, [1], math.nan, math.inf, -math.inf, True]
"""Refused by every numeric annotation (``None`` only where the annotation doesn't allow it)."""


def bad_values(annotation: Any) -> list[Any]:
    """Values of the wrong type for ``annotation``: strings for numbers, non-integers, NaN, inf, strings for
    booleans, non-callables, sequences of the wrong elements."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        options = [a for a in arguments if a is not type(None)]
        assert len(options) == 1, annotation
        return [value for value in bad_values(options[0]) if value is not None]
    if annotation is int:
        return [*NOT_A_NUMBER, 2.5, 3.0]
    if annotation is float:
        return NOT_A_NUMBER
    if annotation is bool:
        return ["no", "False", 1, 0, None]
    if origin is Literal:
        return ["nonsense", 1, None, [arguments[0]]]
    if origin is collections.abc.Callable:
        return [3, "predict", [len], None if type(None) not in arguments else 3]
    if origin is collections.abc.Sequence:
        element = arguments[0]
        return ["abc", 3, None, *[[value] for value in bad_values(element) if value is not None]]
    if annotation is nn.Module:
        return ["net", 3, None, [nn.Linear(2, 2)]]
    raise AssertionError(f"no bad values for {annotation}")


OUT_OF_RANGE = {
    CompressionBoundReporter: {
        "delta": [0.0, 1.0, -0.1, 1.5],
        "every_n_epochs": [0, -1],
        "levels": [(), (1,), (2, 0)],
        "prune": [(), (1.0,), (-0.1,), (0.0, 1.5)],
        "methods": [()],
        "num_examples": [0, -5],
        "screening_samples": [0],
        "finalists": [0],
        "stability_samples": [0],
    },
    SubspaceTraining: {"dimension": [0, -3], "seed": [-1, 2**32]},
    RandomSubspace: {"shapes": [()], "dimension": [0], "seed": [-1, 2**32]},
    to_subspace: {"dimension": [0], "seed": [-1, 2**32]},
    QuantizationConfig: {"levels": [1, 0], "prune": [1.0, -0.5]},
    configuration_grid: {"levels": [()], "prune": [()], "methods": [()]},
}

VALID = {
    CompressionBoundReporter: {},
    SubspaceTraining: {"dimension": 4},
    RandomSubspace: {"shapes": [torch.Size([2, 3])], "dimension": 4, "seed": 0},
    to_subspace: {"module": nn.Linear(2, 2), "dimension": 4},
    QuantizationConfig: {"method": "uniform", "levels": 4},
    configuration_grid: {"levels": (2, 3)},
}


def _annotations(target: Any) -> dict[str, Any]:
    function = target.__init__ if isinstance(target, type) else target
    hints = typing.get_type_hints(function)
    if isinstance(target, type) and not hints.keys() - {"return"}:  # a dataclass: its fields
        hints = typing.get_type_hints(target)
    return {name: hint for name, hint in hints.items() if name != "return"}


def _cases() -> list[Any]:
    cases = []
    for target, valid in VALID.items():
        for name, annotation in _annotations(target).items():
            values = bad_values(annotation) + OUT_OF_RANGE[target].get(name, [])
            cases += [
                pytest.param(target, valid, name, value, id=f"{target.__name__}-{name}-{value!r}") for value in values
            ]
    return cases


@pytest.mark.parametrize(("target", "valid", "name", "value"), _cases())
def test_every_bad_argument_is_refused_naming_it(target, valid, name, value):
    with pytest.raises(ArgumentError, match=f"`{name}`"):
        target(**{**valid, name: value})


@pytest.mark.parametrize("target", list(VALID))
def test_valid_arguments_are_accepted(target):
    target(**VALID[target])


def test_the_sweep_covers_every_argument():
    assert set(_annotations(CompressionBoundReporter)) == {
        "delta",
        "when",
        "every_n_epochs",
        "levels",
        "prune",
        "methods",
        "num_examples",
        "screening_samples",
        "finalists",
        "arora",
        "capacity",
        "stability_samples",
        "predict_fn",
        "target_fn",
        "loss_fn",
    }
    assert set(_annotations(QuantizationConfig)) == {"method", "levels", "prune"}
    assert len(_cases()) > 150
