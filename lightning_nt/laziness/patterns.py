"""Activation patterns: which linear piece each unit is on for which examples, and how many of those flipped.

Allen-Zhu, Li & Song (2019) show that in over-parameterised networks few activation patterns change during
training; the fraction of (example, unit) patterns that flipped since initialisation measures it directly. For a
ReLU the pattern is the sign of the unit's input (on or off); for an activation with more linear pieces, such as
ReLU6 or a Hardtanh, it is the index of the piece (below, between or above the clamp's bounds).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_nt.common.activations import ElementwiseFunction, clamp_bounds, computed_function
from lightning_nt.common.compiled import eager_execution, named_modules, uncompiled_name
from lightning_nt.laziness.ntk import ForwardFn

__all__ = [
    "ACTIVATIONS",
    "RECOGNISED_FUNCTIONS",
    "activation_layers",
    "activation_patterns",
    "is_activation",
    "pattern_flips",
    "piece_boundaries",
]

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
)
"""The activations found by module type: the ReLU family, whose gate is the sign of their input, and the clamps.
A unit of ReLU, LeakyReLU, PReLU or RReLU changes its linear piece exactly when its input changes sign; for the
smooth ones (ELU, GELU, SiLU, ...) the sign is where the unit turns from nearly off to nearly linear. A Hardtanh
(and ReLU6, a Hardtanh from 0 to 6) has three linear pieces, below, between and above its bounds, and a unit changes
piece at either (:func:`piece_boundaries`). Tanh and sigmoid have no pieces: not in it."""

RECOGNISED_FUNCTIONS: tuple[ElementwiseFunction, ...] = ("relu", "leaky_relu", "hardtanh", "gelu", "silu")
"""The functions a module of another class is recognised by, from what it computes
(:func:`~lightning_nt.common.activations.computed_function`): a ``class MyReLU(nn.Module)``, ``nn.Hardtanh(0, inf)``,
a model's own LeakyReLU or ``x.clamp(0, 6)``, HuggingFace's ``GELUActivation``. The same recognition as
RepresentationSimilarity's, less tanh and sigmoid."""


def piece_boundaries(module: nn.Module) -> tuple[float, ...]:
    """The inputs at which a unit of the activation ``module`` moves to another linear piece, ascending; empty when
    ``module`` is not an activation (:func:`is_activation`).

    A clamp (``nn.Hardtanh``, ``nn.ReLU6`` or a module of another class computing one,
    :func:`~lightning_nt.common.activations.clamp_bounds`) has its finite bounds; every other activation of
    :data:`ACTIVATIONS` or :data:`RECOGNISED_FUNCTIONS` has 0, its gate.

    Examples:
        >>> piece_boundaries(nn.ReLU6()), piece_boundaries(nn.Hardtanh(-2.0, 3.0)), piece_boundaries(nn.GELU())
        ((0.0, 6.0), (-2.0, 3.0), (0.0,))
        >>> piece_boundaries(nn.Hardtanh(0.0, float("inf"))), piece_boundaries(nn.Tanh())
        ((0.0,), ())
    """
    bounds = clamp_bounds(module)
    if bounds is not None:
        return tuple(bound for bound in bounds if math.isfinite(bound))
    if isinstance(module, ACTIVATIONS) or computed_function(module) in RECOGNISED_FUNCTIONS:
        return (0.0,)
    return ()


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation whose units' linear pieces (or gates) the patterns follow: one of
    :data:`ACTIVATIONS` by type, or a parameter-free module of another class that computes one of
    :data:`RECOGNISED_FUNCTIONS` (and, for a clamp, clamps at least one end).

    Examples:
        >>> class MyReLU6(nn.Module):
        ...     def forward(self, x):
        ...         return x.clamp(0, 6)
        >>> is_activation(MyReLU6()), is_activation(nn.LeakyReLU()), is_activation(nn.Tanh())
        (True, True, False)
    """
    return bool(piece_boundaries(module))


def activation_layers(module: nn.Module) -> list[str]:
    """Names of the submodules of ``module`` that are activations (:func:`is_activation`).

    Examples:
        >>> activation_layers(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU(), nn.Tanh()))
        ['1', '3']
    """
    return [name for name, child in named_modules(module).items() if is_activation(child)]


@torch.no_grad()
def activation_patterns(
    module: nn.Module, inputs: Any, layers: Sequence[str] | None = None, forward_fn: ForwardFn | None = None
) -> dict[str, Tensor]:
    """The pattern ``[m, units]`` of each layer on ``inputs``: which linear piece each unit's pre-activation is on.

    For an activation module (:func:`is_activation`) with one boundary (the ReLU family: 0) the pattern is the sign
    of its input, the gate of the unit (``True`` where positive); with more (a clamp such as ``nn.ReLU6`` or
    ``nn.Hardtanh``, :func:`piece_boundaries`) it is the index of the piece, ``uint8``: the number of boundaries the
    input is above (0 below the lower bound, 1 between, 2 above the upper). For any other named layer (say the
    ``Linear`` before a functional ``F.relu``) the pattern is the sign of its output.
    ``layers`` defaults to every activation module (:func:`activation_layers`). Units are the flattened
    non-batch dimensions (for a convolution, every channel at every position). A module called several times in
    one forward pass (one ``nn.ReLU`` shared by the blocks of a ResNet) contributes the units of every call,
    concatenated. Layers of a submodule compiled with ``torch.compile`` are named with or without its
    ``_orig_mod.``, and keyed without it.

    Examples:
        >>> net = nn.Sequential(nn.Linear(1, 2), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0], [-1.0]])), net[0].bias.zero_()
        >>> activation_patterns(net, torch.tensor([[2.0], [-3.0]]))
        {'1': tensor([[ True, False],
                [False,  True]])}
        >>> net[1] = nn.ReLU6()
        >>> activation_patterns(net, torch.tensor([[7.0], [-3.0]]))  # above 6, between; below 0, between
        {'1': tensor([[2, 0],
                [0, 1]], dtype=torch.uint8)}
    """
    names = [uncompiled_name(name) for name in layers] if layers is not None else activation_layers(module)
    found = named_modules(module)
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"No submodule named {missing} in {type(module).__name__}; choose among {sorted(found)}.")
    calls: dict[str, list[Tensor]] = {name: [] for name in names}
    with _recording(found, names, calls), eager_execution():  # hooks inside compiled code would not fire
        (forward_fn or _call)(module, inputs)
    absent = [name for name in names if not calls[name]]
    if absent:
        raise RuntimeError(f"The layers {absent} were not called in the forward pass, so they have no pattern.")
    return {name: torch.cat(calls[name], dim=1) for name in names}


def pattern_flips(before: Mapping[str, Tensor], after: Mapping[str, Tensor]) -> dict[str, float]:
    """The fraction of (example, unit) patterns (signs or piece indices) that differ between two pattern sets, per
    layer and overall (``""``).

    The overall fraction weighs each layer by its number of (example, unit) pairs.

    Examples:
        >>> pattern_flips({"a": torch.tensor([[True, True]])}, {"a": torch.tensor([[True, False]])})
        {'a': 0.5, '': 0.5}
    """
    if before.keys() != after.keys():
        raise ValueError(f"The pattern sets cover different layers: {sorted(before)} and {sorted(after)}.")
    flips: dict[str, float] = {}
    changed = total = 0
    for name, first in before.items():
        second = after[name]
        if first.shape != second.shape:
            raise ValueError(f"Layer {name!r} has patterns of shapes {tuple(first.shape)} and {tuple(second.shape)}.")
        count = int((first != second.to(first.device)).sum())
        flips[name] = count / max(first.numel(), 1)
        changed, total = changed + count, total + first.numel()
    flips[""] = changed / max(total, 1)
    return flips


def _call(module: nn.Module, batch: Any) -> Tensor:
    return module(batch)


@contextmanager
def _recording(modules: Mapping[str, nn.Module], names: Sequence[str], into: dict[str, list[Tensor]]) -> Iterator[None]:
    handles = [_record_calls(name, modules[name], into) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _record_calls(name: str, layer: nn.Module, into: dict[str, list[Tensor]]) -> RemovableHandle:
    """Record each call's pattern: an activation's from its input, read before the call (a forward PRE-hook: an
    in-place one, ``nn.ReLU6(inplace=True)`` or a model's ``x.clamp_(0, 6)``, overwrites its input with the clamped
    values, hiding the units above the bound); any other layer's from its output, its sign."""
    boundaries = piece_boundaries(layer)
    if boundaries:
        return layer.register_forward_pre_hook(
            lambda _, args, kwargs: into[name].append(_pattern(_first_input(args, kwargs), boundaries)),
            with_kwargs=True,
        )
    return layer.register_forward_hook(lambda _, args, output: into[name].append(_pattern(output, (0.0,))))


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """An activation's input, passed by position or by keyword (``self.act(input=x)``)."""
    return args[0] if args else kwargs.get("input", next(iter(kwargs.values())))


def _pattern(value: Tensor, boundaries: tuple[float, ...]) -> Tensor:
    return _pieces(value.detach().flatten(1), boundaries)


def _pieces(value: Tensor, boundaries: tuple[float, ...]) -> Tensor:
    """The piece each entry of ``value`` is on: ``value > boundary`` for one boundary, else the count of boundaries
    it is above (``uint8``)."""
    if len(boundaries) == 1:
        return value > boundaries[0]
    pieces = torch.zeros_like(value, dtype=torch.uint8)
    for boundary in boundaries:
        pieces += value > boundary
    return pieces
