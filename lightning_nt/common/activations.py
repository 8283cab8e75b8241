"""Which activation a module computes, read from what it computes: for activation classes written elsewhere.

Capabilities find a network's activation modules by class (``nn.ReLU``, ``nn.GELU``, ...), but libraries and models
bring their own classes for the same functions: HuggingFace's ``GELUActivation`` (BERT), ``NewGELUActivation``
(GPT-2), ``FastGELUActivation``, a model's ``class Swish(nn.Module)`` or ``class MyReLU(nn.Module)``, or a module of
another class set up to compute ReLU (``nn.Hardtanh(0, inf)``, ``nn.Threshold(0, 0)``). A module that holds no
parameters, buffers or submodules is run on a fixed grid of inputs instead, and recognised when it computes one of
:data:`ELEMENTWISE_FUNCTIONS`, elementwise, to float32 precision. Anything else (``QuickGELU``'s
``x * sigmoid(1.702 x)``, ReLU6, a softmax, a dropout) is not recognised. RepresentationSimilarity maps the function
to its intertwiner group, LazinessMonitor keeps the ReLU family.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nt.common.state import preserved_state

__all__ = ["ELEMENTWISE_FUNCTIONS", "ElementwiseFunction", "computed_function"]

ElementwiseFunction = Literal["relu", "gelu", "silu", "tanh", "sigmoid"]

ELEMENTWISE_FUNCTIONS: tuple[tuple[Callable[[Tensor], Tensor], ElementwiseFunction], ...] = (
    (F.relu, "relu"),
    (F.gelu, "gelu"),
    (functools.partial(F.gelu, approximate="tanh"), "gelu"),
    (F.silu, "silu"),
    (torch.tanh, "tanh"),
    (torch.sigmoid, "sigmoid"),
)
"""The functions recognised, each with its name (GELU's exact form and tanh approximation are both ``"gelu"``)."""

_TOLERANCE = 1e-5


def _grid() -> Tensor:
    """Two rows (the second reversed, so that a map that mixes positions shows) of 241 points in [-6, 6] and points
    out to +-1e4, so that a function equal to one of ours on a bounded range only (ReLU6) shows too."""
    far = torch.tensor([10.0, 20.0, 50.0, 100.0, 1e3, 1e4])
    points = torch.cat([-far.flip(0), torch.linspace(-6.0, 6.0, 241), far])
    return torch.stack([points, points.flip(0)])


def computed_function(module: nn.Module) -> ElementwiseFunction | None:
    """The elementwise function ``module`` computes, if it is one of :data:`ELEMENTWISE_FUNCTIONS` and ``module``
    holds no parameters, buffers or submodules; else None.

    The module runs once, in eval mode, on a CPU float32 grid, with its modes and every random generator restored;
    the answer is kept for the module object (a monitor that looks for activations at every measurement runs it once).

    Examples:
        >>> class MyReLU(nn.Module):
        ...     def forward(self, x):
        ...         return x.clamp(min=0)
        >>> computed_function(MyReLU()), computed_function(nn.Hardtanh(0, float("inf"))), computed_function(nn.ReLU6())
        ('relu', 'relu', None)
    """
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return None
    if next(module.children(), None) is not None:
        return None
    if module not in _RECOGNISED:
        _RECOGNISED[module] = _recognised(module)
    return _RECOGNISED[module]


_RECOGNISED: weakref.WeakKeyDictionary[nn.Module, ElementwiseFunction | None] = weakref.WeakKeyDictionary()


def _recognised(module: nn.Module) -> ElementwiseFunction | None:
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
        if torch.allclose(output, function(grid), rtol=_TOLERANCE, atol=_TOLERANCE):
            return name
    return None
