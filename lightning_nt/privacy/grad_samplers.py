"""Per-example gradient rules for layers Opacus does not know (so they need not fall back to functorch), and for
embeddings, whose Opacus rules disagree with PyTorch's own gradient.

``nn.Embedding`` with ``padding_idx``: PyTorch gives the padding row no gradient, Opacus's rule gives it one (so
DP-SGD trained the padding vector). ``nn.EmbeddingBag``: Opacus's rule needs 1-D input with offsets (it crashed
on the common 2-D input), counts a token repeated in a bag once, and ignores ``per_sample_weights`` and
``padding_idx``; the rule here forms each bag's gradient as the forward pooled it. Convolutions: Opacus's rule
formed wrong per-example gradients from a ``channels_last`` input (their sum was not the gradient); it is given
contiguous tensors.

:class:`~lightning_nt.common.StandardizedConv2d` convolves with ``w_hat = (w - mean) / std`` (per output
channel, over its ``n`` inputs). Opacus's convolution rule gives each example's gradient ``g`` with respect
to ``w_hat``; the chain rule through the standardisation gives, per example and output channel,
``dL/dw = (g - mean(g)) / (sigma + eps) - w_hat * mean(g * w_hat) / sigma``.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from torch import Tensor, nn

from lightning_nt.common.layers import StandardizedConv2d

__all__ = [
    "conv_grad_sample",
    "embedding_bag_grad_sample",
    "embedding_grad_sample",
    "standardization_backward",
    "standardized_conv_grad_sample",
]


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def conv_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Opacus's per-example gradients of a convolution, from contiguous inputs and output gradients."""
    return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops.contiguous())


@register_grad_sampler(StandardizedConv2d)
def standardized_conv_grad_sample(
    layer: StandardizedConv2d, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of a weight-standardised convolution's raw weight (and bias)."""
    as_conv = nn.Conv2d.__new__(nn.Conv2d)  # Opacus dispatches on the exact type; share the layer's state
    as_conv.__dict__ = layer.__dict__
    samples = conv_grad_sample(as_conv, activations, backprops)  # with respect to w_hat
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


@register_grad_sampler(nn.Embedding)
def embedding_grad_sample(
    layer: nn.Embedding, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus's per-example gradients of an embedding table, with the padding row's left at zero, as PyTorch's."""
    samples = compute_embedding_grad_sample(layer, activations, backprops)
    if layer.padding_idx is not None and layer.weight in samples:
        samples[layer.weight][:, layer.padding_idx] = 0.0
    return samples


@register_grad_sampler(nn.EmbeddingBag)
def embedding_bag_grad_sample(
    layer: nn.EmbeddingBag, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of an ``EmbeddingBag`` table called on 2-D input (one bag per example, its row): each
    position adds its bag's output gradient to its table row, weighted as the forward pooled it (1 for ``"sum"``,
    one over the bag's non-padding length for ``"mean"``); padding positions add nothing.

    Not supported: ``per_sample_weights`` (on 2-D input they are passed by keyword, which Opacus's hooks don't
    record, so the weights would be left out of the per-example gradients).
    """
    if not layer.weight.requires_grad:
        return {}
    tokens = activations[0]
    if tokens.ndim != 2 or layer.mode == "max":
        raise ValueError(
            f"EmbeddingBag(mode={layer.mode!r}) called on {tokens.ndim}-D input has no per-example gradient rule "
            "under DP-SGD: call it on 2-D input (one bag per example, padded with `padding_idx`), with mode='sum' "
            "or 'mean'."
        )
    bags = torch.arange(tokens.shape[0], device=tokens.device).repeat_interleave(tokens.shape[1])
    tokens = tokens.reshape(-1)
    weights = torch.ones(tokens.shape, device=tokens.device)
    if layer.padding_idx is not None:
        weights = weights * (tokens != layer.padding_idx)
    if layer.mode == "mean":
        lengths = torch.zeros(len(backprops), device=tokens.device).index_add_(0, bags, weights)
        weights = weights / lengths.clamp(min=1.0)[bags]
    samples = backprops.new_zeros((len(backprops), *layer.weight.shape))
    samples.index_put_((bags, tokens), weights[:, None].to(backprops.dtype) * backprops[bags], accumulate=True)
    return {layer.weight: samples}
