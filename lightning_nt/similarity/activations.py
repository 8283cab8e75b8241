"""Which intertwiner group an activation module written elsewhere has, read from what it computes.

``layers=None`` compares the outputs of the activation modules, each up to its intertwiner group. ``nn.ReLU``,
``nn.GELU``, ... are known by class (``ACTIVATION_MODULES``), but libraries bring their own classes for the same
functions: HuggingFace's ``GELUActivation`` (BERT), ``NewGELUActivation`` (GPT-2), ``FastGELUActivation``, or a
model's ``class Swish(nn.Module)``. Such a module, holding no parameters, buffers or submodules, is recognised by
the function it computes on a grid (:func:`lightning_nt.common.activations.computed_function`, shared with
LazinessMonitor); anything else (``QuickGELU``'s ``x * sigmoid(1.702 x)``, a softmax, a dropout) is not
recognised and stays out.

The group follows Godfrey et al.'s rule, ``G_sigma = {A : sigma o A = B o sigma}``: a positive scaling ``c`` of a
unit is in it when ``sigma(c x) = c sigma(x)`` (ReLU, LeakyReLU of any slope, a clamp whose finite bounds are 0), a
sign flip when ``sigma(-x) = -sigma(x)`` (tanh, a clamp to ``[-a, a]`` such as ``nn.Hardtanh()``), and the
permutations always. So ``nn.ReLU6`` and any clamp to ``[low, high]`` with a nonzero bound and ``low != -high``
have the permutations only (``"gelu"``'s group): ``relu6(c x) != c relu6(x)`` once ``c x`` passes 6.
"""

from __future__ import annotations

import math

from torch import nn

from lightning_nt.common.activations import ElementwiseFunction, clamp_bounds, computed_function
from lightning_nt.similarity.core import Activation

__all__ = ["clamp_group", "recognised_activation"]

_GROUPS: dict[ElementwiseFunction, Activation] = {
    "relu": "relu",
    "leaky_relu": "relu",  # max(c x, slope c x) = c max(x, slope x) for c > 0: the permutations times the scalings
    "gelu": "gelu",
    "silu": "gelu",  # like GELU, the permutations only (ACTIVATION_MODULES maps nn.SiLU the same way)
    "tanh": "tanh",
    "sigmoid": "sigmoid",
}


def clamp_group(low: float, high: float) -> Activation:
    """The intertwiner group of ``x.clamp(low, high)`` (``nn.Hardtanh(low, high)``), named as
    :func:`~lightning_nt.similarity.intertwiner_similarity` names groups.

    Positive scalings are symmetries when the clamp is positively homogeneous (every finite bound is 0: ReLU and
    ``min(x, 0)``, ``"relu"``), sign flips when it is odd (``low == -high``, ``"tanh"``'s signed permutations), and
    otherwise only the permutations are (``"gelu"``'s group: ReLU6 and every other clamp).

    Examples:
        >>> clamp_group(0.0, 6.0), clamp_group(-1.0, 1.0), clamp_group(0.0, math.inf), clamp_group(-math.inf, 0.0)
        ('gelu', 'tanh', 'relu', 'relu')
    """
    if all(bound == 0 or math.isinf(bound) for bound in (low, high)):
        return "relu"
    return "tanh" if low == -high else "gelu"


def recognised_activation(module: nn.Module) -> Activation | None:
    """The intertwiner group of the elementwise function ``module`` computes, if it is one of ReLU, LeakyReLU, a
    clamp (:func:`clamp_group`: ``nn.ReLU6``, ``nn.Hardtanh``), GELU (exact or tanh approximation), SiLU, tanh or
    sigmoid and ``module`` holds no parameters, buffers or submodules; else None.

    The module runs once, in eval mode, on a CPU float32 grid, with its modes and every random generator restored.

    Examples:
        >>> class GELUActivation(nn.Module):  # as HuggingFace's BERT has it
        ...     def forward(self, x):
        ...         return nn.functional.gelu(x)
        >>> recognised_activation(GELUActivation()), recognised_activation(nn.Softmax(dim=-1))
        ('gelu', None)
        >>> [recognised_activation(module) for module in (nn.ReLU6(), nn.Hardtanh(), nn.LeakyReLU())]
        ['gelu', 'tanh', 'relu']
    """
    function = computed_function(module)
    if function is None:
        return None
    bounds = clamp_bounds(module) if function == "hardtanh" else None
    return _GROUPS[function] if bounds is None else clamp_group(*bounds)
