"""Layers that capabilities handle specially, kept here so that they depend on nothing above ``common``.

:class:`StandardizedConv2d` is the weight-standardised convolution of De et al. (2022): the privacy
capability gives it exact per-example gradient rules, and the demos build wide ResNets from it
(``lightning_nt.demos`` re-exports it under the same name). :func:`reparametrized_modules` finds the modules whose
weights are computed from other parameters, which per-example rules and random subspaces can't handle.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

__all__ = ["StandardizedConv2d", "reparametrized_modules"]


def reparametrized_modules(module: nn.Module) -> list[str]:
    """Names of the submodules whose weights are computed from other parameters: a ``torch.nn.utils.parametrize``
    parametrization (``parametrizations.weight_norm``, ``orthogonal``, a random subspace), or the older
    ``torch.nn.utils.weight_norm``/``spectral_norm`` forward pre-hooks (``<root>`` for the module itself).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> _ = nn.utils.parametrizations.weight_norm(net[0])
        >>> reparametrized_modules(net)
        ['0']
    """
    return [name or "<root>" for name, m in module.named_modules() if _reparametrized(m)]


def _reparametrized(module: nn.Module) -> bool:
    hooks = module._forward_pre_hooks.values()
    return parametrize.is_parametrized(module) or any(isinstance(hook, (WeightNorm, SpectralNorm)) for hook in hooks)


class StandardizedConv2d(nn.Conv2d):
    """A convolution whose kernel is standardised (zero mean, unit variance per output channel) at every call.

    It acts on one example at a time (unlike BatchNorm), so per-example gradients stay meaningful under DP-SGD.

    Example::

        conv = StandardizedConv2d(3, 16, kernel_size=3, padding=1)
        features = conv(torch.randn(8, 3, 32, 32))  # [8, 16, 32, 32]
    """

    def forward(self, inputs: Tensor) -> Tensor:
        weight = self.weight
        mean = weight.mean(dim=(1, 2, 3), keepdim=True)
        std = weight.std(dim=(1, 2, 3), keepdim=True, unbiased=False) + 1e-5
        return self._conv_forward(inputs, (weight - mean) / std, self.bias)  # nn.Conv2d's: padding_mode honoured
