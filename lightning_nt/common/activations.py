"""Which activation a module computes, read from what it computes: for activation classes written elsewhere.

Capabilities find a network's activation modules by class (``nn.ReLU``, ``nn.GELU``, ...), but libraries and models
bring their own classes for the same functions: HuggingFace's ``GELUActivation`` (BERT), ``NewGELUActivation``
(GPT-2), ``FastGELUActivation``, a model's ``class Swish(nn.Module)`` or ``class MyReLU(nn.Module)``, or a module of
another class set up to compute ReLU (``nn.Hardtanh(0, inf)``, ``nn.Threshold(0, 0)``). A module that holds no
parameters, buffers or submodules is run on a fixed grid of inputs instead, and recognised when it computes,
elementwise and to float32 precision, one of :data:`ELEMENTWISE_FUNCTIONS` or a member of two families with a
parameter: a LeakyReLU ``max(x, slope x)`` of any slope (``"leaky_relu"``) and a clamp to any interval
``[low, high]`` (``"hardtanh"``: ``nn.Hardtanh``, ``nn.ReLU6``, a model's ``x.clamp(0, 6)``), whose bounds
:func:`clamp_bounds` gives. Anything else (``QuickGELU``'s ``x * sigmoid(1.702 x)``, a softmax, a dropout, the
identity) is not recognised. RepresentationSimilarity maps the function to its intertwiner group, LazinessMonitor
keeps the piecewise-linear and ReLU-like ones and counts the linear pieces their units are on.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nt.common.state import preserved_state

__all__ = ["ELEMENTWISE_FUNCTIONS", "ElementwiseFunction", "clamp_bounds", "computed_function"]

ElementwiseFunction = Literal["relu", "leaky_relu", "hardtanh", "gelu", "silu", "tanh", "sigmoid"]

ELEMENTWISE_FUNCTIONS: tuple[tuple[Callable[[Tensor], Tensor], ElementwiseFunction], ...] = (
    (F.relu, "relu"),
    (F.gelu, "gelu"),
    (functools.partial(F.gelu, approximate="tanh"), "gelu"),
    (F.silu, "silu"),
    (torch.tanh, "tanh"),
    (torch.sigmoid, "sigmoid"),
)
"""The functions without a parameter recognised, each with its name (GELU's exact form and tanh approximation are
both ``"gelu"``); besides them, the families ``"leaky_relu"`` and ``"hardtanh"`` (see :func:`computed_function`)."""

_TOLERANCE = 1e-5


def _grid() -> Tensor:
    """Two rows (the second reversed, so that a map that mixes positions shows) of 241 points in [-6, 6] and points
    out to +-1e4, so that a function equal to one of ours on a bounded range only (ReLU6) shows too."""
    far = torch.tensor([10.0, 20.0, 50.0, 100.0, 1e3, 1e4])
    points = torch.cat([-far.flip(0), torch.linspace(-6.0, 6.0, 241), far])
    return torch.stack([points, points.flip(0)])


def computed_function(module: nn.Module) -> ElementwiseFunction | None:
    """The elementwise function ``module`` computes, if ``module`` holds no parameters, buffers or submodules and
    computes one of :data:`ELEMENTWISE_FUNCTIONS`, a LeakyReLU ``max(x, slope x)`` (``"leaky_relu"``, any slope but
    0, which is ``"relu"``, and 1) or a clamp to ``[low, high]`` (``"hardtanh"``, see :func:`clamp_bounds`; the
    clamp to ``[0, inf]`` is ``"relu"``); else None.

    The module runs once, in eval mode, on a CPU float32 grid, with its modes and every random generator restored;
    the answer is kept for the module object (a monitor that looks for activations at every measurement runs it once).

    Examples:
        >>> class MyReLU(nn.Module):
        ...     def forward(self, x):
        ...         return x.clamp(min=0)
        >>> computed_function(MyReLU()), computed_function(nn.Hardtanh(0, float("inf"))), computed_function(nn.ReLU6())
        ('relu', 'relu', 'hardtanh')
        >>> computed_function(nn.LeakyReLU(0.2)), computed_function(nn.Identity())
        ('leaky_relu', None)
    """
    recognised = _recognition(module)
    return None if recognised is None else recognised.name


def clamp_bounds(module: nn.Module) -> tuple[float, float] | None:
    """The interval ``(low, high)`` that ``module`` clamps its input to (an end where it doesn't clamp is infinite):
    an ``nn.Hardtanh``'s (so an ``nn.ReLU6``'s) own ``min_val`` and ``max_val``, or, for a module of another class
    that :func:`computed_function` finds to be a ``"hardtanh"``, the bounds read off its output on the grid (in
    float32). None for any other module.

    A clamp is piecewise linear with a piece below ``low``, one between and one above ``high``: LazinessMonitor
    counts a unit moving between them as a flip, and its intertwiner group (RepresentationSimilarity) depends on
    the bounds (positive scalings only when they are 0 or infinite, sign flips only when ``low == -high``).

    Examples:
        >>> class Capped(nn.Module):
        ...     def forward(self, x):
        ...         return x.clamp(-0.5, 4.0)
        >>> clamp_bounds(nn.ReLU6()), clamp_bounds(Capped()), clamp_bounds(nn.Hardtanh(max_val=float("inf")))
        ((0.0, 6.0), (-0.5, 4.0), (-1.0, inf))
        >>> clamp_bounds(nn.ReLU()) is None
        True
    """
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    recognised = _recognition(module)
    return None if recognised is None or recognised.name != "hardtanh" else recognised.bounds


class _Recognised(NamedTuple):
    name: ElementwiseFunction
    bounds: tuple[float, float] | None = None
    """A clamp's interval (``"hardtanh"`` only)."""


_RECOGNISED: weakref.WeakKeyDictionary[nn.Module, _Recognised | None] = weakref.WeakKeyDictionary()


def _recognition(module: nn.Module) -> _Recognised | None:
    """What the parameter-free leaf ``module`` computes, kept for the module object; None for any other module."""
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return None
    if next(module.children(), None) is not None:
        return None
    if module not in _RECOGNISED:
        _RECOGNISED[module] = _recognised(module)
    return _RECOGNISED[module]


def _recognised(module: nn.Module) -> _Recognised | None:
    """Run the parameter-free leaf ``module`` on the grid and name the function it computes."""
    grid = _grid()
    with preserved_state(module, parameters=False, buffers=False, grads=False), torch.no_grad():
        module.eval()
        try:
            output = module.forward(grid.clone())  # not __call__: the module's hooks are not for this grid
        except Exception:
            return None
    if not isinstance(output, Tensor) or output.shape != grid.shape or not output.is_floating_point():
        return None
    output = output.detach().float().cpu()
    for function, name in ELEMENTWISE_FUNCTIONS:
        if _equal(output, function(grid)):
            return _Recognised(name)
    if _equal(output, grid):  # the identity: no activation (every LeakyReLU slope and clamp bound would fit it)
        return None
    bounds = _clamp_fitted(grid, output)
    if bounds is not None:
        return _Recognised("hardtanh", bounds)
    return _Recognised("leaky_relu") if _is_leaky_relu(grid, output) else None


def _equal(output: Tensor, expected: Tensor) -> bool:
    return torch.allclose(output, expected, rtol=_TOLERANCE, atol=_TOLERANCE)


def _clamp_fitted(grid: Tensor, output: Tensor) -> tuple[float, float] | None:
    """The ``(low, high)`` with ``output == grid.clamp(low, high)``, if there is one: the least and the greatest
    output, an end reached only at the grid's own end being infinite."""
    low, high = float(output.min()), float(output.max())
    low = -math.inf if low <= float(grid.min()) * (1 - _TOLERANCE) else low
    high = math.inf if high >= float(grid.max()) * (1 - _TOLERANCE) else high
    if not low < high or not _equal(output, grid.clamp(low, high)):
        return None
    return low, high


def _is_leaky_relu(grid: Tensor, output: Tensor) -> bool:
    """Whether ``output == max(grid, slope grid)`` for the slope its most negative input shows."""
    lowest = grid.argmin()
    slope = float(output.flatten()[lowest] / grid.flatten()[lowest])
    return _equal(output, torch.where(grid > 0, grid, slope * grid))
