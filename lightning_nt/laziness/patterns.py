"""ReLU activation patterns: which units are on for which examples, and how many of those signs flipped.

Allen-Zhu, Li & Song (2019) show that in over-parameterised networks few activation patterns change during
training; the fraction of (example, unit) signs that flipped since initialisation measures it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_nt.common.activations import ElementwiseFunction, computed_function
from lightning_nt.common.compiled import eager_execution, named_modules, uncompiled_name
from lightning_nt.laziness.ntk import ForwardFn

__all__ = [
    "ACTIVATIONS",
    "RECOGNISED_FUNCTIONS",
    "activation_layers",
    "activation_patterns",
    "is_activation",
    "pattern_flips",
]

ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
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
"""The ReLU family found by module type: activations whose gate is the sign of their input. A unit of ReLU,
LeakyReLU, PReLU or RReLU changes its linear piece exactly when its input changes sign (ReLU6 also at 6, its
saturation, which the sign pattern leaves out); for the smooth ones (ELU, GELU, SiLU, ...) the sign is where the
unit turns from nearly off to nearly linear. Tanh, sigmoid and a Hardtanh(-1, 1) have no gate at 0: not in it."""

RECOGNISED_FUNCTIONS: tuple[ElementwiseFunction, ...] = ("relu", "gelu", "silu")
"""The ReLU-family functions a module of another class is recognised by, from what it computes
(:func:`~lightning_nt.common.activations.computed_function`): a ``class MyReLU(nn.Module)``, ``nn.Hardtanh(0, inf)``,
HuggingFace's ``GELUActivation``. The same recognition as RepresentationSimilarity's, less tanh and sigmoid."""


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is a ReLU-family activation: one of :data:`ACTIVATIONS` by type, or a parameter-free module
    of another class that computes one of :data:`RECOGNISED_FUNCTIONS`.

    Examples:
        >>> class MyReLU(nn.Module):
        ...     def forward(self, x):
        ...         return x.clamp(min=0)
        >>> is_activation(MyReLU()), is_activation(nn.LeakyReLU()), is_activation(nn.Tanh())
        (True, True, False)
    """
    return isinstance(module, ACTIVATIONS) or computed_function(module) in RECOGNISED_FUNCTIONS


def activation_layers(module: nn.Module) -> list[str]:
    """Names of the submodules of ``module`` that are ReLU-family activations (:func:`is_activation`).

    Examples:
        >>> activation_layers(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU(), nn.Tanh()))
        ['1', '3']
    """
    return [name for name, child in named_modules(module).items() if is_activation(child)]


@torch.no_grad()
def activation_patterns(
    module: nn.Module, inputs: Any, layers: Sequence[str] | None = None, forward_fn: ForwardFn | None = None
) -> dict[str, Tensor]:
    """The sign pattern ``[m, units]`` (``True`` where positive) of each layer's pre-activation on ``inputs``.

    For an activation module (:func:`is_activation`) the pattern is the sign of its input, the gate of the unit;
    for any other named layer (say the ``Linear`` before a functional ``F.relu``) the sign of its output.
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
    """The fraction of (example, unit) signs that differ between two pattern sets, per layer and overall (``""``).

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
    handles = [modules[name].register_forward_hook(_recorder(name, modules[name], into)) for name in names]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _recorder(name: str, layer: nn.Module, into: dict[str, list[Tensor]]) -> Callable[..., None]:
    gate_on_input = is_activation(layer)

    def record(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        value = args[0] if gate_on_input else output
        into[name].append((value.detach() > 0).flatten(1))

    return record
