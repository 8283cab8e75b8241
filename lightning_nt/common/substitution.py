"""Evaluate a module at other parameter values without touching its parameters: ``substituted``.

Capabilities that differentiate a module with respect to its parameters by ``torch.func`` (tangent kernels, JVPs,
GradInit's scaled weights) need the module's forward at given values. ``torch.func.functional_call`` with
``tie_weights=True`` restores a slot reachable by two module paths (a block registered under two names) with the
substituted value, leaving the module without its ``nn.Parameter`` afterwards; :func:`substituted` matches
parameters by identity instead, so shared blocks, tied weights and random-subspace coordinates come back intact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["substituted"]


@contextmanager
def substituted(module: nn.Module, values: Mapping[str, Tensor]) -> Iterator[None]:
    """Inside the block, every registration of the named parameters of ``module`` holds ``values[name]``.

    Parameters are matched by identity, so a parameter registered in several places (a submodule shared
    under two names, an embedding tied to the output layer, the coordinates of a random subspace) is
    substituted everywhere, and every place gets its ``nn.Parameter`` back when the block ends; the module's
    parameters, their identities and the optimizer's references are unchanged. (``torch.func.functional_call``
    with ``tie_weights=True`` restores a slot reachable by two paths with the substituted value.) Values are
    cast to the parameter's dtype. Any of a tied parameter's names may be used.

    Examples:
        >>> import torch
        >>> shared = nn.Linear(2, 2, bias=False)
        >>> net = nn.Sequential(shared, shared)
        >>> with substituted(net, {"0.weight": torch.eye(2)}):
        ...     net(torch.ones(1, 2))
        tensor([[1., 1.]])
        >>> net[1].weight is shared.weight and isinstance(shared.weight, nn.Parameter)
        True
    """
    parameters = dict(module.named_parameters(remove_duplicate=False))
    by_identity = {id(parameters[name]): value for name, value in values.items()}
    slots = [
        (owner, attribute, parameter)
        for owner in module.modules()
        for attribute, parameter in owner._parameters.items()
        if parameter is not None and id(parameter) in by_identity
    ]
    try:
        for owner, attribute, parameter in slots:
            owner._parameters[attribute] = by_identity[id(parameter)].to(parameter.dtype)
        yield
    finally:
        for owner, attribute, parameter in slots:
            owner._parameters[attribute] = parameter
