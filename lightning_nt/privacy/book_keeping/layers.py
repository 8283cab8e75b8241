"""The book-keeping rules of ``Linear`` (and HuggingFace's transposed ``Conv1D``), ``Embedding``, ``LayerNorm``/
``GroupNorm`` (and torchvision's channels-first ``LayerNorm2d``), ``PReLU``, and Opacus's as the fallback.

Each rule takes a layer, its recorded calls (inputs and output gradients, never its outputs: a layer's output may be
changed in place before the backward pass) and the clipper, and returns one
:class:`~lightning_nt.privacy.book_keeping.pieces.Piece` per trained parameter. A ``Linear`` layer's positions are its
leading dimensions after the batch; its weight's norms are ghost or instantiated, whichever costs less. An embedding's
norms come from the ghost identity over token positions (equal tokens interact). Norm layers and layers with only an
Opacus per-sample rule form per-example gradients outright.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import Tensor, nn

from lightning_nt.privacy.book_keeping.norms import instantiate, outer_product_norms
from lightning_nt.privacy.book_keeping.pieces import Piece, join, masked, per_unit_piece, per_unit_pieces, total

if TYPE_CHECKING:
    from lightning_nt.privacy.book_keeping.clipper import BookKeepingClipper

__all__ = [
    "channels_first_layer_norm_pieces",
    "check_embedding",
    "embedding_pieces",
    "linear_pieces",
    "normalization_pieces",
    "opacus_pieces",
    "prelu_pieces",
    "qualified_name",
    "transposed_linear_pieces",
]


def linear_pieces(
    layer: nn.Linear, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[Piece]:
    """A linear layer ``y = a Wᵀ + b``: weight norms ghost or instantiated (the cheaper), the bias's per-example
    gradients outright."""
    return _affine_pieces(layer.weight, layer.bias, inputs, grads, clipper, weight_in_by_out=False)


def qualified_name(kind: type) -> str:
    """``module.QualifiedName`` of a class, as :func:`supported_layer_names` lists them.

    Examples:
        >>> qualified_name(nn.Linear)
        'torch.nn.modules.linear.Linear'
    """
    return f"{kind.__module__}.{kind.__qualname__}"


def transposed_linear_pieces(
    layer: nn.Module, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[Piece]:
    """HuggingFace's ``Conv1D`` (GPT-2's projections): ``y = a W + b`` with ``W`` of shape ``[in, out]``, a linear
    layer whose weight is stored transposed; the linear rule, each per-example gradient ``[in, out]``. A layer of that
    name whose weight is laid out otherwise is refused (the rule goes by the class's name alone)."""
    features = (inputs[0].shape[-1], grads[0].shape[-1])
    if tuple(layer.weight.shape) != features:
        raise ValueError(
            f"{qualified_name(type(layer))} has a weight of shape {tuple(layer.weight.shape)} "
            f"for inputs of {features[0]} and outputs of {features[1]} features: book-keeping's rule for it assumes "
            "transformers' layout [in, out]. Use grad_sample_mode='hooks'."
        )
    return _affine_pieces(layer.weight, getattr(layer, "bias", None), inputs, grads, clipper, weight_in_by_out=True)


def _affine_pieces(
    weight: nn.Parameter,
    bias: nn.Parameter | None,
    inputs: list[Tensor],
    grads: list[Tensor],
    clipper: BookKeepingClipper,
    weight_in_by_out: bool,
) -> list[Piece]:
    """``y = a Wᵀ + b`` (``W``: ``[out, in]``), or ``y = a W + b`` with ``weight_in_by_out``, over any leading
    dimensions (positions): each example's weight gradient is ``sum_t g_t a_tᵀ`` (or its transpose)."""
    patches = join([a.reshape(a.shape[0], -1, a.shape[-1]) for a in inputs])  # [N, T, d]
    gradient = join([g.reshape(g.shape[0], -1, g.shape[-1]) for g in grads])  # [N, T, p]
    pieces: list[Piece] = []

    def oriented(a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:  # the factors of sum_t g_t a_tᵀ in W's layout
        return (a, g) if weight_in_by_out else (g, a)

    if clipper.trainable(weight):
        if instantiate(patches.shape[1], patches.shape[2], gradient.shape[2]):  # then no larger than T (d + p)
            left, right = oriented(patches, gradient)
            pieces.append(per_unit_piece(clipper, weight, torch.bmm(left.transpose(1, 2), right)))
        else:

            def weight_sum(row_weights: Tensor, keep: Tensor | None) -> Tensor:
                weighted = masked(gradient, keep) * row_weights[:, None, None]
                return torch.einsum("nti,ntj->ij", *oriented(masked(patches, keep), weighted))

            squared_norms = outer_product_norms(clipper.units(patches), clipper.units(gradient))
            pieces.append(Piece(weight, squared_norms, clipper.per_rows(weight_sum)))
    if clipper.trainable(bias):
        pieces.append(per_unit_piece(clipper, bias, gradient.sum(1)))
    return pieces


def embedding_pieces(
    layer: nn.Embedding, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[Piece]:
    """An embedding table: per-unit norms by the ghost identity over token positions (equal tokens interact)."""
    if not clipper.trainable(layer.weight):
        return []
    indices = join([i.reshape(i.shape[0], -1) for i in inputs])
    gradient = join([g.reshape(g.shape[0], -1, g.shape[-1]) for g in grads])
    if layer.padding_idx is not None:  # PyTorch gives the padding row no gradient
        gradient = gradient * (indices != layer.padding_idx)[..., None]
    indices = clipper.units(indices[..., None])[..., 0]  # [B, T]
    gradient = clipper.units(gradient)  # [B, T, dim]
    same = (indices[:, :, None] == indices[:, None, :]).to(gradient.dtype)
    squared_norms = (same * torch.bmm(gradient, gradient.transpose(1, 2))).sum((1, 2))

    def clipped_sum(weights: Tensor, keep: Tensor | None) -> Tensor:
        weighted = (masked(gradient, keep) * weights[:, None, None]).flatten(0, 1)
        table = torch.zeros(layer.weight.shape, dtype=weighted.dtype, device=weighted.device)
        return table.index_add_(0, indices.flatten(), weighted)

    return [Piece(layer.weight, squared_norms, clipped_sum)]


def check_embedding(name: str, layer: nn.Embedding) -> None:
    """Refuse the embedding options whose gradients are not a sum over token positions."""
    if layer.sparse or layer.scale_grad_by_freq:
        raise ValueError(f"Embedding {name}: `sparse` and `scale_grad_by_freq` are not supported under DP-SGD.")


def normalization_pieces(
    layer: nn.LayerNorm | nn.GroupNorm,
    inputs: list[Tensor],
    grads: list[Tensor],
    clipper: BookKeepingClipper,
) -> list[Piece]:
    """A norm layer's affine parameters: per-example gradients outright (they are as small as a bias)."""
    weight_rows: Tensor | float = 0.0
    bias_rows: Tensor | float = 0.0
    for a, g in zip(inputs, grads):
        if isinstance(layer, nn.LayerNorm):
            normalized = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
            reduce = tuple(range(1, a.ndim - len(layer.normalized_shape)))
        else:
            normalized = F.group_norm(a, layer.num_groups, eps=layer.eps)
            reduce = tuple(range(2, a.ndim))
        weight_rows = weight_rows + _sum_over(normalized * g, reduce)
        bias_rows = bias_rows + _sum_over(g, reduce)
    return per_unit_pieces(clipper, [(layer.weight, weight_rows), (layer.bias, bias_rows)])


def channels_first_layer_norm_pieces(
    layer: nn.LayerNorm, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[Piece]:
    """torchvision's ``LayerNorm2d`` (ConvNeXt): ``[N, C, H, W]`` moved to ``[N, H, W, C]``, normalised over ``C``
    and moved back; the layer-norm rule on its inputs and output gradients with the channels last."""
    moved_inputs, moved_grads = [a.movedim(1, -1) for a in inputs], [g.movedim(1, -1) for g in grads]
    return normalization_pieces(layer, moved_inputs, moved_grads, clipper)


def prelu_pieces(
    layer: nn.PReLU, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[Piece]:
    """``nn.PReLU``: each example's gradient of a slope is ``sum g * min(x, 0)`` over the positions it applies to
    (every element for one slope, dimension 1's channel for ``num_parameters`` of them)."""
    slopes = layer.weight.numel()
    rows = total([(g * a.clamp(max=0)).reshape(a.shape[0], slopes, -1).sum(2) for a, g in zip(inputs, grads)])
    return per_unit_pieces(clipper, [(layer.weight, rows)])


def _sum_over(tensor: Tensor, dims: tuple[int, ...]) -> Tensor:
    return tensor.sum(dims) if dims else tensor  # an empty tuple would sum over every dimension


def opacus_pieces(
    layer: nn.Module, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[Piece]:
    """A layer without a rule here: Opacus's per-sample rule for its type, call by call, summed per row."""
    rule = GradSampleModule.GRAD_SAMPLERS[type(layer)]
    per_row: dict[int, tuple[nn.Parameter, Tensor]] = {}
    # Opacus's rules skip a parameter that does not require grad, which every trained one doesn't while recording
    trained = [p for p in layer.parameters(recurse=False) if clipper.trainable(p) and not p.requires_grad]
    for parameter in trained:
        parameter.requires_grad_(True)
    try:
        for a, g in zip(inputs, grads):
            for parameter, samples in rule(layer, [a], g).items():
                previous = per_row.get(id(parameter))
                per_row[id(parameter)] = (parameter, samples if previous is None else previous[1] + samples)
    finally:
        for parameter in trained:
            parameter.requires_grad_(False)
    return per_unit_pieces(clipper, list(per_row.values()))
