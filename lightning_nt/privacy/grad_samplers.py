"""Per-example gradient rules for layers Opacus does not know (so they need not fall back to functorch), and for
embeddings, whose Opacus rules disagree with PyTorch's own gradient.

``nn.Embedding`` with ``padding_idx``: PyTorch gives the padding row no gradient, Opacus's rule gives it one (so
DP-SGD trained the padding vector). ``nn.EmbeddingBag``: Opacus's rule needs 1-D input with offsets (it crashed
on the common 2-D input), counts a token repeated in a bag once, and ignores ``per_sample_weights`` and
``padding_idx``; the rule here forms each bag's gradient as the forward pooled it (with its weights in the
gradients' dtype: ``"mean"`` weighted a float64 model's positions by fp32 fractions). Ghost clipping's embedding norms
counted the padding row's gradient (they over-clipped examples with padding); the norm rule here leaves it out.
Convolutions: Opacus's rule formed wrong per-example gradients from a ``channels_last`` input (their sum was not the
gradient); it is given contiguous tensors. It also padded every input with zeros whatever the layer's
``padding_mode`` (``"reflect"``, ``"replicate"``, ``"circular"``: a clipped sum off by half its size); it is given
the input as the layer pads it, and no padding. ``nn.LayerNorm(bias=False)``: Opacus's rule crashed on the missing
bias. Ghost norms of ``nn.Linear`` on inputs with two or more position dimensions (``[B, T1, T2, d]``): Opacus's rule
gave none (a crash); they are taken over the flattened positions.

:class:`~lightning_nt.common.StandardizedConv2d` convolves with ``w_hat = (w - mean) / std`` (per output
channel, over its ``n`` inputs). Opacus's convolution rule gives each example's gradient ``g`` with respect
to ``w_hat``; the chain rule through the standardisation gives, per example and output channel,
``dL/dw = (g - mean(g)) / (sigma + eps) - w_hat * mean(g * w_hat) / sigma``.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.embedding import compute_embedding_grad_sample, compute_embedding_norm_sample
from opacus.grad_sample.linear import compute_linear_norm_sample
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n
from torch import Tensor, nn

from lightning_nt.common.layers import StandardizedConv2d

__all__ = [
    "conv_grad_sample",
    "embedding_bag_grad_sample",
    "embedding_grad_sample",
    "embedding_norm_sample",
    "explicitly_padded",
    "layer_norm_grad_sample",
    "linear_norm_sample",
    "standardization_backward",
    "standardized_conv_grad_sample",
]


@register_grad_sampler([nn.Conv1d, nn.Conv2d, nn.Conv3d])
def conv_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Opacus's per-example gradients of a convolution, from contiguous inputs (padded as the layer pads them) and
    output gradients."""
    unpadded, inputs = explicitly_padded(layer, activations[0])
    return compute_conv_grad_sample(unpadded, [inputs.contiguous()], backprops.contiguous())


_Conv = TypeVar("_Conv", bound=nn.Conv1d | nn.Conv2d | nn.Conv3d)


def explicitly_padded(layer: _Conv, inputs: Tensor) -> tuple[_Conv, Tensor]:
    """``inputs`` padded as ``layer``'s forward pads them (its ``padding_mode``, and ``"same"``'s uneven split), and
    a view of ``layer`` (the same parameters and type) with no padding: the convolution of the one with the other is
    the layer's, so rules that know only zero padding of a number are exact for every padding.

    Examples:
        >>> conv = nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular")
        >>> view, padded = explicitly_padded(conv, torch.arange(4.0).view(1, 1, 4))
        >>> view.padding, padded.flatten().tolist(), view.weight is conv.weight
        ((0,), [3.0, 0.0, 1.0, 2.0, 3.0, 0.0], True)
    """
    if layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return layer, inputs
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    padded = F.pad(inputs, layer._reversed_padding_repeated_twice, mode=mode)
    view = type(layer).__new__(type(layer))
    view.__dict__ = {**layer.__dict__, "padding": (0,) * len(layer.kernel_size), "padding_mode": "zeros"}
    return view, padded


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


@register_norm_sampler(nn.Embedding)
def embedding_norm_sample(
    layer: nn.Embedding, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Ghost clipping's per-example gradient norms of an embedding table, the padding row's gradient left out (PyTorch
    gives it none)."""
    if layer.padding_idx is not None:
        backprops = backprops * (activations[0] != layer.padding_idx).unsqueeze(-1).to(backprops.dtype)
    return compute_embedding_norm_sample(layer, activations, backprops)


@register_norm_sampler(nn.Linear)
def linear_norm_sample(layer: nn.Linear, activations: list[Tensor], backprops: Tensor) -> dict[nn.Parameter, Tensor]:
    """Ghost clipping's per-example gradient norms of a linear layer over any number of position dimensions (Opacus's
    rule covers none or one and returned no norm for more, which crashed as "parameter tying" on the next call)."""
    inputs = activations[0]
    if backprops.dim() > 3:
        inputs = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])
        backprops = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])
    return compute_linear_norm_sample(layer, [inputs], backprops)


@register_grad_sampler(nn.LayerNorm)
def layer_norm_grad_sample(
    layer: nn.LayerNorm, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients of a layer norm's affine parameters (Opacus's rule, which also crashed without a bias)."""
    normalized = F.layer_norm(activations[0], layer.normalized_shape, eps=layer.eps)
    per_element = [(layer.weight, normalized * backprops), (layer.bias, backprops)]
    return {
        parameter: sum_over_all_but_batch_and_last_n(grads, parameter.dim())
        for parameter, grads in per_element
        if parameter is not None and parameter.requires_grad
    }


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
            "under DP-SGD: it needs 2-D input (one bag per example, padded with `padding_idx`) and mode='sum' or "
            "'mean'."
        )
    bags = torch.arange(tokens.shape[0], device=tokens.device).repeat_interleave(tokens.shape[1])
    tokens = tokens.reshape(-1)
    weights = backprops.new_ones(tokens.shape)  # in the gradients' dtype: a "mean" bag's fractions are not rounded
    if layer.padding_idx is not None:
        weights = weights * (tokens != layer.padding_idx)
    if layer.mode == "mean":
        lengths = backprops.new_zeros(len(backprops)).index_add_(0, bags, weights)
        weights = weights / lengths.clamp(min=1.0)[bags]
    samples = backprops.new_zeros((len(backprops), *layer.weight.shape))
    samples.index_put_((bags, tokens), weights[:, None] * backprops[bags], accumulate=True)
    return {layer.weight: samples}
