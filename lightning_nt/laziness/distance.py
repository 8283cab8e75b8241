"""How far the weights moved from their initialisation, relative to their initial size."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RelativeDistance", "relative_distance"]


@dataclass(frozen=True)
class RelativeDistance:
    """``||theta - theta_0|| / ||theta_0||`` overall and per group (parameter tensor or layer)."""

    overall: float
    parts: dict[str, float]


@torch.no_grad()
def relative_distance(
    params: Mapping[str, Tensor], initial: Mapping[str, Tensor], by_layer: bool = False
) -> RelativeDistance:
    """Relative distance ``||theta - theta_0||_2 / ||theta_0||_2`` of ``params`` from ``initial``, overall and per part.

    Parts are the parameter tensors, or with ``by_layer`` the layers (names up to the last dot: a ``Linear``'s
    weight and bias together). A part whose initial norm is zero (a bias initialised at zero) has no relative
    distance and is left out of ``parts``; it still counts in ``overall``. Computed in fp64.

    Examples:
        >>> start = {"w": torch.tensor([3.0, 4.0]), "b": torch.zeros(1)}
        >>> relative_distance({"w": torch.tensor([3.0, 5.0]), "b": torch.zeros(1)}, start)
        RelativeDistance(overall=0.2, parts={'w': 0.2})
    """
    if params.keys() != initial.keys():
        raise ValueError(f"`params` and `initial` name different tensors: {sorted(params)} and {sorted(initial)}.")
    moved: dict[str, float] = {}
    size: dict[str, float] = {}
    for name, value in params.items():
        part = name.rsplit(".", 1)[0] if by_layer else name
        start = initial[name].double()
        moved[part] = moved.get(part, 0.0) + float((value.double().to(start.device) - start).square().sum())
        size[part] = size.get(part, 0.0) + float(start.square().sum())
    total = sum(size.values())
    overall = math.sqrt(sum(moved.values()) / total) if total > 0 else math.nan
    return RelativeDistance(overall, {part: math.sqrt(moved[part] / size[part]) for part in moved if size[part] > 0})
