"""Layers that capabilities handle specially, kept here so that they depend on nothing above ``common``.

:class:`StandardizedConv2d` is the weight-standardised convolution of De et al. (2022): the privacy
capability gives it exact per-example gradient rules, and the demos build wide ResNets from it
(``lightning_nt.demos`` re-exports it under the same name).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StandardizedConv2d"]


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
        return F.conv2d(inputs, (weight - mean) / std, self.bias, self.stride, self.padding, self.dilation, self.groups)
