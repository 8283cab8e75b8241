"""Per-example gradient rules for layers Opacus does not know, so they need not fall back to functorch.

:class:`~lightning_nt.common.StandardizedConv2d` convolves with ``w_hat = (w - mean) / std`` (per output
channel, over its ``n`` inputs). Opacus's convolution rule gives each example's gradient ``g`` with respect
to ``w_hat``; the chain rule through the standardisation gives, per example and output channel,
``dL/dw = (g - mean(g)) / (sigma + eps) - w_hat * mean(g * w_hat) / sigma``.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from torch import Tensor, nn

from lightning_nt.common.layers import StandardizedConv2d

__all__ = ["standardization_backward", "standardized_conv_grad_sample"]


@register_grad_sampler(StandardizedConv2d)
def standardized_conv_grad_sample(
    layer: StandardizedConv2d, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of a weight-standardised convolution's raw weight (and bias)."""
    as_conv = nn.Conv2d.__new__(nn.Conv2d)  # Opacus dispatches on the exact type; share the layer's state
    as_conv.__dict__ = layer.__dict__
    samples = compute_conv_grad_sample(as_conv, activations, backprops)  # with respect to w_hat
    samples[layer.weight] = standardization_backward(layer.weight, samples[layer.weight])
    return samples


def standardization_backward(weight: Tensor, grad: Tensor) -> Tensor:
    """The gradient with respect to the raw ``weight`` of a weight-standardised convolution from ``grad``, the
    gradient with respect to its standardised kernel ``w_hat`` (``[..., *weight.shape]``: any leading dimensions,
    e.g. one per example; the map is linear, so it applies to sums of gradients too).

    Examples:
        >>> weight = torch.randn(4, 3, 3, 3)
        >>> bool(standardization_backward(weight, torch.ones(2, 4, 3, 3, 3)).abs().max() < 1e-5)  # w_hat is centred
        True
    """
    weight = weight.detach().to(torch.promote_types(weight.dtype, grad.dtype))
    dims = (-3, -2, -1)  # one output channel's inputs
    mean = weight.mean(dim=dims, keepdim=True)
    sigma = weight.std(dim=dims, keepdim=True, unbiased=False)
    std = sigma + 1e-5  # as in the forward
    standardized = (weight - mean) / std
    centred = grad - grad.mean(dim=dims, keepdim=True)
    projection = (grad * standardized).mean(dim=dims, keepdim=True) * standardized
    return centred / std - projection / sigma  # d sigma / d w = (w - mean) / (n sigma)
