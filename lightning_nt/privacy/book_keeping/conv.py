"""The book-keeping rules of convolutions: ``Conv1d``, ``Conv2d``, ``Conv3d`` (any padding and ``padding_mode``), the
weight-standardised ``StandardizedConv2d``, and ``ConvTranspose1d``/``2d``/``3d`` (as the adjoint convolution).

A kernel's per-example norms come from instantiated per-example kernels (:func:`conv_per_example_grads`) or from
ghost Gram matrices of im2col patches, whichever costs less; its clipped sum from the per-example kernels if they
take no more memory than the activations, else from one weight-gradient call with the clip factors folded into the
output gradient. A standardised kernel's raw-weight norm is exact from the same quantities
(:class:`~lightning_nt.privacy.book_keeping.pieces.Standardization`); the chain rule through the standardisation is
applied once, to the clipped sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nt.common.layers import StandardizedConv2d
from lightning_nt.privacy.book_keeping.norms import instantiate, keep_per_example, outer_product_norms
from lightning_nt.privacy.book_keeping.pieces import (
    Piece,
    Standardization,
    join,
    kernel_squared_norms,
    masked,
    per_unit_piece,
    total,
)
from lightning_nt.privacy.grad_samplers import explicitly_padded, standardization_backward

if TYPE_CHECKING:
    from lightning_nt.privacy.book_keeping.clipper import BookKeepingClipper

__all__ = ["check_conv", "conv_per_example_grads", "conv_pieces", "transposed_conv_pieces"]

_Transposed = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def conv_pieces(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    inputs: list[Tensor],
    grads: list[Tensor],
    clipper: BookKeepingClipper,
) -> list[Piece]:
    """A convolution: its kernel (:func:`_weight_piece`) and its bias's per-example gradients. A padding other than
    zeros of a number (``"same"``, ``padding_mode="reflect"``, ...) is applied to the inputs here, so the kernel's
    rule sees an unpadded convolution of the same parameters."""
    pieces: list[Piece] = []
    padded = [explicitly_padded(layer, a) for a in inputs]
    if padded:
        layer, inputs = padded[0][0], [a for _, a in padded]
    if clipper.trainable(layer.weight):
        pieces.append(_weight_piece(layer, inputs, grads, clipper))
    return pieces + _bias_pieces(layer, grads, clipper)


def transposed_conv_pieces(
    layer: _Transposed, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[Piece]:
    """A transposed convolution (stride, padding, ``output_padding`` or ``output_size``, dilation, groups): it is the
    adjoint of the convolution with the same kernel from its output's channels to its input's,
    ``<conv_transpose(x; W), g> = <x, conv(g; W)>``, so its kernel's per-example gradient is that convolution's with
    input ``g`` and output gradient ``x``. The convolution rule with the two roles swapped gives the norms (ghost or
    instantiated, whichever costs less) and the clipped sum (one weight-gradient call with the clip factors folded
    into ``x``, or the per-example kernels where they are small); the bias's per-example gradients come from ``g``.

    Examples:
        >>> from torch.func import grad, vmap
        >>> layer = nn.ConvTranspose1d(2, 4, 3, stride=2).double()
        >>> x = torch.randn(3, 2, 5, dtype=torch.float64)
        >>> g = torch.randn_like(layer(x))
        >>> adjoint = _adjoint_convolution(layer)
        >>> per_example = conv_per_example_grads(adjoint, g, _matched(adjoint, x, g))
        >>> pairing = lambda w, xi, gi: (F.conv_transpose1d(xi[None], w, None, 2) * gi).sum()
        >>> torch.allclose(per_example, vmap(grad(pairing), in_dims=(None, 0, 0))(layer.weight.detach(), x, g))
        True
    """
    pieces: list[Piece] = []
    if clipper.trainable(layer.weight):
        adjoint = _adjoint_convolution(layer)
        matched = [_matched(adjoint, a, g) for a, g in zip(inputs, grads)]
        pieces.append(_weight_piece(adjoint, grads, matched, clipper))
    return pieces + _bias_pieces(layer, grads, clipper)


def _bias_pieces(layer: nn.Module, grads: list[Tensor], clipper: BookKeepingClipper) -> list[Piece]:
    """A convolution's bias: each example's gradient is its output gradient summed over positions."""
    if not clipper.trainable(layer.bias):
        return []
    return [per_unit_piece(clipper, layer.bias, total([g.flatten(2).sum(2) for g in grads]))]


def _adjoint_convolution(layer: _Transposed) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    """The convolution whose input gradient ``layer`` computes: the same kernel (shared, ``[C_in, C_out / groups,
    *k]`` read as ``[out, in / groups, *k]``), stride, padding, dilation and groups, from ``layer``'s output
    channels to its input channels."""
    spatial = len(layer.kernel_size)
    kind = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial]
    adjoint = kind.__new__(kind)
    adjoint.__dict__ = {
        **layer.__dict__,
        "in_channels": layer.out_channels,
        "out_channels": layer.in_channels,
        "transposed": False,
        "output_padding": (0,) * spatial,
    }
    return adjoint


def _matched(adjoint: nn.Conv1d | nn.Conv2d | nn.Conv3d, inputs: Tensor, grads: Tensor) -> Tensor:
    """The transposed convolution's ``inputs`` as the adjoint convolution's output gradient: zero-extended at the end
    to the size of ``adjoint(grads)``, which is larger where the output padding is at least the stride (allowed
    where the dilation is larger); the extension pairs with nothing."""
    spatial = len(adjoint.kernel_size)
    extra = [
        (grads.shape[2 + i] + 2 * adjoint.padding[i] - adjoint.dilation[i] * (adjoint.kernel_size[i] - 1) - 1)
        // adjoint.stride[i]
        + 1
        - inputs.shape[2 + i]
        for i in range(spatial)
    ]
    return F.pad(inputs, [side for more in reversed(extra) for side in (0, more)]) if any(extra) else inputs


def check_conv(name: str, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
    """Refuse (for a standardised kernel) the groups the rule does not cover."""
    if type(layer) is StandardizedConv2d and layer.groups != 1:
        raise ValueError(f"Weight-standardised convolution {name}: groups != 1 is not supported.")


def _weight_piece(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    inputs: list[Tensor],
    grads: list[Tensor],
    clipper: BookKeepingClipper,
) -> Piece:
    """Norms from instantiated per-example kernels or from ghost Gram matrices, whichever costs less; the clipped sum
    from the per-example kernels if they are no larger than the activations, else by one weight-gradient call."""
    standardization = Standardization(layer.weight, grads[0].dtype) if type(layer) is StandardizedConv2d else None
    positions = sum(g[0, 0].numel() for g in grads)
    kernel, out_per_group = layer.weight[0].numel(), layer.out_channels // layer.groups
    if instantiate(positions, kernel, out_per_group):
        per_row = total([conv_per_example_grads(layer, a, g) for a, g in zip(inputs, grads)])
        activations = sum(a[0].numel() + g[0].numel() for a, g in zip(inputs, grads))
        if keep_per_example(layer.weight.numel(), activations):
            return per_unit_piece(clipper, layer.weight, per_row, standardization)
        squared_norms = kernel_squared_norms(clipper.unit_sum(per_row), standardization)
    else:
        squared_norms = _ghost_norms(layer, inputs, grads, standardization, clipper)
    weight_grad = _weight_gradient_of(layer)

    def weight_sum(row_weights: Tensor, keep: Tensor | None) -> Tensor:
        calls = [
            weight_grad(
                masked(a, keep),
                layer.weight.shape,
                masked(g, keep) * row_weights.view(-1, *([1] * (g.ndim - 1))),
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )
            for a, g in zip(inputs, grads)
        ]
        summed = total(calls)
        return summed if standardization is None else standardization_backward(layer.weight, summed)

    return Piece(layer.weight, squared_norms, clipper.per_rows(weight_sum))


def _ghost_norms(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    inputs: list[Tensor],
    grads: list[Tensor],
    standardization: Standardization | None,
    clipper: BookKeepingClipper,
) -> Tensor:
    """Per-unit squared norms of a convolution's kernel gradient by ghost Gram matrices, group by group."""
    groups = layer.groups
    unfolded = [_unfold(a, layer) for a in inputs]  # [N, groups, d_g, T] per call; calls are more positions
    per_group = [g.reshape(g.shape[0], groups, layer.out_channels // groups, -1) for g in grads]
    norms = []
    for group in range(groups):
        patches = join([u[:, group].transpose(1, 2) for u in unfolded])  # [N, T, d_g], a view for one call
        gradient = join([g[:, group].transpose(1, 2) for g in per_group])
        if standardization is not None:  # groups == 1 (checked when the clipper is built)
            norms.append(_standardized_ghost_norms(clipper, standardization, patches, gradient))
        else:
            norms.append(outer_product_norms(clipper.units(patches), clipper.units(gradient)))
    return total(norms)


def _standardized_ghost_norms(
    clipper: BookKeepingClipper, standardization: Standardization, patches: Tensor, grads: Tensor
) -> Tensor:
    """The raw weight of a weight-standardised convolution: its per-example norm, exact from ghost quantities
    (:class:`Standardization`). ``sum |g|²/s²`` is the outer-product norm with ``G / s``; ``S1 = sum_t G_t (sum of
    patch u_t)`` and ``S2 = sum_t G_t Y_t``, ``Y_t = w_hat u_t`` the convolution's output without bias.

    ``Y`` is recomputed here from the recorded patches, in the norms' dtype (one product, the cost of the layer's
    forward convolution), never taken from the layer's output: an in-place operation after the layer (``out +=
    shortcut``, ``LeakyReLU(inplace=True)``) changes that tensor before the backward pass, and under bf16 autocast or
    TF32 it is rounded; either would make the norm disagree with the clipped sum, which is formed from the patches
    and output gradients alone, and release a clipped example above the bound."""
    patches, grads = clipper.units(patches), clipper.units(grads)  # [B, T, d], [B, T, p] (w.r.t. w_hat)
    produced = torch.matmul(patches, standardization.standardized.T)  # [B, T, p]
    s1 = torch.einsum("btp,bt->bp", grads, patches.sum(2))
    s2 = (grads * produced).sum(1)
    return outer_product_norms(patches, grads / standardization.s) + standardization.correction(s1, s2)


def conv_per_example_grads(
    layer: nn.Conv1d | nn.Conv2d | nn.Conv3d,
    inputs: Tensor,
    grads: Tensor,
    method: Literal["auto", "grouped", "unfold"] = "auto",
) -> Tensor:
    """Every example's gradient with respect to a convolution's kernel, ``[N, *layer.weight.shape]``.

    ``"grouped"``: one weight-gradient call with the examples as groups (Rochette et al. 2019): no im2col copy, the
    fastest on a CPU. ``"unfold"``: im2col as a strided view and one copy, then one batched product (one kernel per
    step on a GPU, where many-group weight gradients are slow). ``"auto"``: grouped on a CPU, unfold elsewhere.

    Examples:
        >>> conv, x = nn.Conv2d(2, 3, 3, padding=1).double(), torch.randn(4, 2, 5, 5, dtype=torch.float64)
        >>> g = torch.randn_like(conv(x))
        >>> grouped, unfolded = (conv_per_example_grads(conv, x, g, method) for method in ("grouped", "unfold"))
        >>> tuple(grouped.shape), torch.allclose(grouped, unfolded)
        ((4, 3, 2, 3, 3), True)
    """
    if method == "auto":
        method = "grouped" if inputs.device.type == "cpu" else "unfold"
    rows, groups = inputs.shape[0], layer.groups
    if method == "unfold":
        patches = _unfold(inputs, layer)  # [N, groups, d_g, T]
        per_group = grads.reshape(rows, groups, layer.out_channels // groups, -1)  # [N, groups, p_g, T]
        return torch.matmul(per_group, patches.transpose(2, 3)).reshape(rows, *layer.weight.shape)
    stacked = _weight_gradient_of(layer)(
        inputs.reshape(1, -1, *inputs.shape[2:]),
        (rows * layer.out_channels, *layer.weight.shape[1:]),
        grads.reshape(1, -1, *grads.shape[2:]),
        layer.stride,
        layer.padding,
        layer.dilation,
        rows * groups,
    )
    return stacked.view(rows, *layer.weight.shape)


def _weight_gradient_of(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> Callable[..., Tensor]:
    return _WEIGHT_GRADIENTS[len(layer.kernel_size)]


_WEIGHT_GRADIENTS = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _unfold(inputs: Tensor, layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> Tensor:
    """im2col as one strided view and one copy: ``[N, groups, C_g * prod(kernel), T]``.

    ``F.unfold`` launches one kernel per example on CUDA and has no 1-D form.
    """
    spatial = inputs.ndim - 2
    padding = [p for p in reversed(layer.padding) for _ in range(2)]
    padded = F.pad(inputs, padding) if any(padding) else inputs
    rows, channels = padded.shape[:2]
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    out_sizes = [(padded.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(spatial)]
    strides = padded.stride()
    view = padded.as_strided(
        (rows, channels, *kernel, *out_sizes),
        (
            strides[0],
            strides[1],
            *(strides[2 + i] * dilation[i] for i in range(spatial)),
            *(strides[2 + i] * stride[i] for i in range(spatial)),
        ),
    )
    return view.reshape(rows, layer.groups, (channels // layer.groups) * math.prod(kernel), math.prod(out_sizes))
