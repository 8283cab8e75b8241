"""The ghost Gram identity and the cost rules that choose, per layer, how a per-example norm is taken.

``||sum_t g_t a_tᵀ||² = sum_{t,s} (a_t·a_s)(g_t·g_s)`` over a layer's positions ``t`` gives an example's squared
gradient norm without forming the gradient (``T²(d+p)`` work); instantiating the ``p x d`` gradient costs ``T d p``.
:func:`outer_product_norms` takes either (Bu et al.'s mixed ghost norm); :func:`instantiate` and
:func:`keep_per_example` are the rules the layer rules share.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["instantiate", "keep_per_example", "outer_product_norms"]


def outer_product_norms(
    patches: Tensor, grads: Tensor, method: Literal["auto", "ghost", "instantiate"] = "auto"
) -> Tensor:
    """``||sum_t g_bt u_btᵀ||²`` for every ``b``, from ``patches [B, T, d]`` and ``grads [B, T, p]``.

    ``"ghost"`` sums ``(U Uᵀ) ∘ (G Gᵀ)`` over position pairs (``B T² (d + p)`` work), ``"instantiate"`` forms the
    ``p x d`` matrices (``B T d p``); ``"auto"`` takes the cheaper (Bu et al.'s mixed ghost norm).

    Examples:
        >>> u, g = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
        >>> torch.allclose(outer_product_norms(u, g, "ghost"), outer_product_norms(u, g, "instantiate"))
        True
    """
    positions, d, p = patches.shape[1], patches.shape[2], grads.shape[2]
    if method == "auto":
        if positions == 1:
            return patches.square().sum((1, 2)) * grads.square().sum((1, 2))
        method = "instantiate" if instantiate(positions, d, p) else "ghost"
    if method == "ghost":
        gram_a = torch.bmm(patches, patches.transpose(1, 2))
        gram_g = torch.bmm(grads, grads.transpose(1, 2))
        return (gram_a * gram_g).sum((1, 2))
    return torch.bmm(grads.transpose(1, 2), patches).square().sum((1, 2))


def instantiate(positions: int, d: int, p: int) -> bool:
    """Whether forming a ``p x d`` per-example gradient over ``positions`` costs less than its Gram matrices."""
    return positions > 1 and positions * (d + p) >= d * p


def keep_per_example(kernel: int, activations: int) -> bool:
    """Whether a row's instantiated kernel gradient takes no more memory than the row's activations that would
    otherwise be kept for the clipped sum (its input and output gradient): reuse it then (fastDP's "MixOpt")."""
    return kernel <= activations
