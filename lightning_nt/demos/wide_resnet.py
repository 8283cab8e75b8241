"""Wide ResNets (Zagoruyko & Komodakis) with BatchNorm, or GroupNorm and weight standardisation for DP-SGD.

De et al. (2022) train WRN-16-4 / WRN-40-4 with weight-standardised convolutions and GroupNorm(16) under
DP-SGD: both act on one example at a time, so per-example gradients stay meaningful.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nt.common.layers import StandardizedConv2d  # re-exported here: same class, old pickles load
from lightning_nt.common.validation import check_choice

__all__ = ["StandardizedConv2d", "wide_resnet"]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: Literal["batch", "group"]) -> None:
        super().__init__()
        conv = nn.Conv2d if norm == "batch" else StandardizedConv2d
        self.norm1, self.conv1 = _norm(cin, norm), conv(cin, cout, 3, stride, 1, bias=False)
        self.norm2, self.conv2 = _norm(cout, norm), conv(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else conv(cin, cout, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        return skip + self.conv2(F.relu(self.norm2(self.conv1(out))))


def _norm(channels: int, norm: Literal["batch", "group"]) -> nn.Module:
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(min(16, channels), channels)


def wide_resnet(
    depth: int = 16, widen: int = 4, classes: int = 10, norm: Literal["batch", "group"] = "batch"
) -> nn.Module:
    """WRN-``depth``-``widen`` for 32x32 RGB images; ``norm="group"`` gives the DP-SGD variant of De et al.

    Examples:
        >>> import torch
        >>> wide_resnet(16, 1, norm="group")(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    if (depth - 4) % 6:
        raise ValueError(f"`depth` must be 6n + 4 (16, 22, 28, 40, ...), got {depth}.")
    check_choice("norm", norm, ("batch", "group"))
    blocks_per_stage = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    conv = nn.Conv2d if norm == "batch" else StandardizedConv2d
    layers: list[nn.Module] = [conv(3, widths[0], 3, 1, 1, bias=False)]
    for stage in range(3):
        for i in range(blocks_per_stage):
            cin = widths[stage] if i == 0 else widths[stage + 1]
            stride = (1 if stage == 0 else 2) if i == 0 else 1
            layers.append(_Block(cin, widths[stage + 1], stride, norm))
    layers += [_norm(widths[3], norm), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[3], classes)]
    return nn.Sequential(*layers)
