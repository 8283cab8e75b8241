"""Stand-ins for other packages' layers that book-keeping recognises by qualified class name: faithful copies of
their forward passes under their packages' module and class names, so that the tests need neither package."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Conv1D", "LayerNorm2d"]


class Conv1D(nn.Module):
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): a linear layer with its weight ``[nx, nf]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class LayerNorm2d(nn.LayerNorm):
    """``torchvision.models.convnext.LayerNorm2d``: a layer norm over the channels of an ``[N, C, H, W]`` input."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


Conv1D.__module__ = "transformers.pytorch_utils"
LayerNorm2d.__module__ = "torchvision.models.convnext"
