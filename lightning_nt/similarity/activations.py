"""Which intertwiner group an activation module written elsewhere has, read from what it computes.

``layers=None`` compares the outputs of the activation modules, each up to its intertwiner group. ``nn.ReLU``,
``nn.GELU``, ... are known by class (``ACTIVATION_MODULES``), but libraries bring their own classes for the same
functions: HuggingFace's ``GELUActivation`` (BERT), ``NewGELUActivation`` (GPT-2), ``FastGELUActivation``, or a
model's ``class Swish(nn.Module)``. Such a module, holding no parameters, buffers or submodules, is recognised by
the function it computes on a grid (:func:`lightning_nt.common.activations.computed_function`, shared with
LazinessMonitor); anything else (``QuickGELU``'s ``x * sigmoid(1.702 x)``, ReLU6, a softmax, a dropout) is not
recognised and stays out.
"""

from __future__ import annotations

from torch import nn

from lightning_nt.common.activations import ElementwiseFunction, computed_function
from lightning_nt.similarity.core import Activation

__all__ = ["recognised_activation"]

_GROUPS: dict[ElementwiseFunction, Activation] = {
    "relu": "relu",
    "gelu": "gelu",
    "silu": "gelu",  # like GELU, the permutations only (ACTIVATION_MODULES maps nn.SiLU the same way)
    "tanh": "tanh",
    "sigmoid": "sigmoid",
}


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
    function = computed_function(module)
    return None if function is None else _GROUPS[function]
