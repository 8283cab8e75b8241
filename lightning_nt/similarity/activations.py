"""Which activation a module computes, read from what it computes: for activation classes written elsewhere.

``layers=None`` compares the outputs of the activation modules, each up to its intertwiner group. ``nn.ReLU``,
``nn.GELU``, ... are known by class (``ACTIVATION_MODULES``), but libraries bring their own classes for the same
functions: HuggingFace's ``GELUActivation`` (BERT), ``NewGELUActivation`` (GPT-2), ``FastGELUActivation``, or a
model's ``class Swish(nn.Module)``. A module that holds no parameters, buffers or submodules is run on a fixed grid
of inputs instead, and recognised when it computes one of the functions whose group is known, elementwise, to
float32 precision. Anything else (``QuickGELU``'s ``x * sigmoid(1.702 x)``, a softmax, a dropout) is not
recognised and stays out, as before.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nt.common.state import preserved_state
from lightning_nt.similarity.core import Activation

__all__ = ["recognised_activation"]

_FUNCTIONS: tuple[tuple[Callable[[Tensor], Tensor], Activation], ...] = (
    (F.relu, "relu"),
    (F.gelu, "gelu"),
    (functools.partial(F.gelu, approximate="tanh"), "gelu"),
    (F.silu, "gelu"),  # like GELU, the permutations only (ACTIVATION_MODULES maps nn.SiLU the same way)
    (torch.tanh, "tanh"),
    (torch.sigmoid, "sigmoid"),
)
_TOLERANCE = 1e-5


def _grid() -> Tensor:
    """Two rows (the second reversed, so that a map that mixes positions shows) of 241 points in [-6, 6] and points
    out to +-1e4, so that a function equal to one of ours on a bounded range only (ReLU6) shows too."""
    far = torch.tensor([10.0, 20.0, 50.0, 100.0, 1e3, 1e4])
    points = torch.cat([-far.flip(0), torch.linspace(-6.0, 6.0, 241), far])
    return torch.stack([points, points.flip(0)])


def recognised_activation(module: nn.Module) -> Activation | None:
    """The intertwiner group of the elementwise function ``module`` computes, if it is one of ReLU, GELU (exact or
    tanh approximation), SiLU, tanh or sigmoid and ``module`` holds no parameters, buffers or submodules; else None.

    The module runs once, in eval mode, on a CPU float32 grid, with its modes and every random generator restored.

    Examples:
        >>> class GELUActivation(nn.Module):  # as HuggingFace's BERT has it
        ...     def forward(self, x):
        ...         return nn.functional.gelu(x)
        >>> recognised_activation(GELUActivation()), recognised_activation(nn.Softmax(dim=-1))
        ('gelu', None)
    """
    if next(module.parameters(), None) is not None or next(module.buffers(), None) is not None:
        return None
    if next(module.children(), None) is not None:
        return None
    grid = _grid()
    with preserved_state(module, parameters=False, buffers=False, grads=False), torch.no_grad():
        module.eval()
        try:
            output = module(grid.clone())
        except Exception:
            return None
    if not isinstance(output, Tensor) or output.shape != grid.shape or not output.is_floating_point():
        return None
    output = output.detach().float().cpu()
    for function, group in _FUNCTIONS:
        if torch.allclose(output, function(grid), rtol=_TOLERANCE, atol=_TOLERANCE):
            return group
    return None
