"""One parameter's contribution to the clipped step (a :class:`Piece`), and how the layer rules build one.

A piece holds each privacy unit's squared gradient norm for one parameter and a function that forms the sum of the
clipped gradients once the clip factors are known. :func:`per_unit_piece` builds one from per-row gradients formed
outright; :class:`Standardization` is the algebra that turns gradients with respect to a weight-standardised kernel
into the raw weight's norms. ``join`` and ``total`` combine a layer's several calls in one forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_nt.privacy.grad_samplers import standardization_backward

if TYPE_CHECKING:
    from lightning_nt.privacy.book_keeping.clipper import BookKeepingClipper

__all__ = [
    "ClippedSum",
    "Piece",
    "Standardization",
    "join",
    "kernel_squared_norms",
    "masked",
    "per_unit_piece",
    "per_unit_pieces",
    "total",
]

ClippedSum = Callable[[Tensor, "Tensor | None"], Tensor]
"""``(weights, keep) -> sum``: each unit's weight (its clip factor) and, unless ``keep`` is ``None``, per unit
whether to keep it at all (a unit with a non-finite gradient is masked out, not multiplied by zero: ``nan * 0`` is
``nan``)."""


@dataclass
class Piece:
    """One parameter's contribution: per-unit squared gradient norms, and how to form the sum of clipped gradients."""

    parameter: nn.Parameter
    squared_norms: Tensor
    clipped_sum: ClippedSum


def masked(tensor: Tensor, keep: Tensor | None) -> Tensor:
    """``tensor`` with the rows (dimension 0) not in ``keep`` set to zero (all of them kept if ``keep`` is None)."""
    return tensor if keep is None else torch.where(keep.view(-1, *([1] * (tensor.ndim - 1))), tensor, 0.0)


def join(tensors: list[Tensor], dim: int = 1) -> Tensor:
    """The calls of a layer as more positions (no copy for the usual single call)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def total(tensors: list[Tensor]) -> Tensor:
    """The sum of a layer's calls' contributions (``sum()`` would start with a copy of the first)."""
    return sum(tensors[1:], tensors[0])


def per_unit_piece(
    clipper: BookKeepingClipper,
    parameter: nn.Parameter,
    per_row: Tensor,
    standardization: Standardization | None = None,
) -> Piece:
    """Per-row gradients formed outright (biases, norm layers, Opacus's rules, kernels whose per-example gradients
    cost less than their Gram matrices and take less memory than the layer's activations): norms and the clipped sum
    straight from them. With ``standardization``, they are gradients with respect to a standardised kernel: the raw
    weight's norms follow from them, and the chain rule is applied once, to the clipped sum."""
    per_unit = clipper.unit_sum(per_row)

    def clipped_sum(weights: Tensor, keep: Tensor | None) -> Tensor:
        units = masked(per_unit, keep)
        summed = (weights @ units.flatten(1)).view(units.shape[1:])
        return summed if standardization is None else standardization_backward(parameter, summed)

    return Piece(parameter, kernel_squared_norms(per_unit, standardization), clipped_sum)


def per_unit_pieces(clipper: BookKeepingClipper, per_row: list[tuple[nn.Parameter | None, Tensor]]) -> list[Piece]:
    """:func:`per_unit_piece` for each ``(parameter, per-row gradients)`` whose parameter is trained."""
    return [per_unit_piece(clipper, parameter, rows) for parameter, rows in per_row if clipper.trainable(parameter)]


def kernel_squared_norms(per_unit: Tensor, standardization: Standardization | None) -> Tensor:
    """``[B, ...] -> [B]``: each unit's squared norm (of the raw weight's gradient, with ``standardization``)."""
    if standardization is None:
        return torch.linalg.vector_norm(per_unit.flatten(1), dim=1).square()
    channels = per_unit.flatten(2)  # [B, p, d]
    squares = torch.linalg.vector_norm(channels, dim=2).square() / standardization.s.square()
    s1, s2 = channels.sum(2), (channels * standardization.standardized).sum(2)  # as einsum: a slow bmm on a CPU
    return squares.sum(1) + standardization.correction(s1, s2)


class Standardization:
    """Per output channel of a weight-standardised kernel ``w_hat = (w - mean) / s``, ``s = sigma + eps`` over its
    ``d`` inputs, and ``g`` an example's gradient with respect to ``w_hat``: the raw gradient is
    ``(g - mean(g)) / s - w_hat S2 / (d sigma)`` with ``S2 = g · w_hat``; as ``w_hat`` is centred and
    ``|w_hat|² = d sigma² / s²``, its squared norm is ``(|g|² - S1²/d) / s² + S2² (1/s² - 2/(s sigma)) / d`` with
    ``S1 = sum(g)``."""

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        flat = weight.detach().to(dtype).flatten(1)
        self.fan_in = flat.shape[1]
        self.sigma = flat.std(1, unbiased=False)
        self.s = self.sigma + 1e-5  # as in the forward
        self.standardized = (flat - flat.mean(1, keepdim=True)) / self.s[:, None]  # [p, d]

    def correction(self, s1: Tensor, s2: Tensor) -> Tensor:
        """The raw squared norm minus ``sum(|g|² / s²)`` over channels, per unit, from ``S1``, ``S2`` (``[B, p]``)."""
        d, s, sigma = self.fan_in, self.s, self.sigma
        return (-s1.square() / (d * s.square()) + s2.square() * (1 / s.square() - 2 / (s * sigma)) / d).sum(1)
