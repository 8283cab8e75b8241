"""Training any module in a random subspace ``theta = theta0 + P w`` (Li et al. 2018; Lotfi et al. 2022).

A network trained in a ``d``-dimensional random subspace is described by ``w`` (``d`` numbers) and the
seed that draws both ``theta0`` and ``P``, so its description is short and its compression bound can
be tight where the full network's would be vacuous. :func:`to_subspace` re-draws ``theta0`` from the
seed with every submodule's own ``reset_parameters`` (so the initialisation is the module's usual one,
yet fixed by the seed), freezes it, and makes each parameter a function of the shared ``w`` with
``torch.nn.utils.parametrize``: the module's code, its ``training_step`` and its optimizer (built from
``self.parameters()``, which now yields ``w`` and the frozen ``theta0``) stay as they are.

``P`` is never stored densely: the block of rows belonging to a parameter with ``n`` entries is the
Kronecker product of two Gaussian matrices of sizes ``(ceil(sqrt n), d1)`` and ``(ceil(n / rows), d2)``
with ``d1 d2 >= d``, truncated to ``n`` rows and scaled by ``1 / sqrt(D)`` (``D`` = all entries), so
every coordinate of ``theta`` moves like under a dense Gaussian ``P`` with unit-norm columns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_nt.common.state import preserved_rng

__all__ = ["RandomSubspace", "find_subspace", "to_subspace"]


class RandomSubspace(nn.Module):
    """The trainable coordinates ``w`` and the seeded projection of a module trained in a subspace."""

    def __init__(self, shapes: list[torch.Size], dimension: int, seed: int) -> None:
        super().__init__()
        if dimension < 1:
            raise ValueError(f"`dimension` must be >= 1, got {dimension}.")
        if not 0 <= seed < 2**32:
            raise ValueError(f"`seed` must be in [0, 2**32), got {seed}.")
        self.dimension, self.seed = dimension, seed
        self.weight = nn.Parameter(torch.zeros(dimension))
        rows = math.ceil(math.sqrt(dimension))
        self.factors = rows, math.ceil(dimension / rows)
        for index, (left, right) in enumerate(self._draw_projections(shapes)):
            self.register_buffer(f"left_{index}", left, persistent=False)
            self.register_buffer(f"right_{index}", right, persistent=False)
        self._numels = [math.prod(shape) for shape in shapes]

    def offset(self, index: int) -> Tensor:
        """``P_index w``: the displacement of parameter ``index`` from ``theta0``, flattened."""
        rows, columns = self.factors
        padded = torch.nn.functional.pad(self.weight, (0, rows * columns - self.dimension)).view(rows, columns)
        left, right = getattr(self, f"left_{index}"), getattr(self, f"right_{index}")
        return (left @ padded @ right.T).reshape(-1)[: self._numels[index]]

    def projections_match_seed(self) -> bool:
        """Whether the projection buffers are exactly what the seed draws (what a decoder would use)."""
        shapes = [torch.Size([n]) for n in self._numels]
        redrawn = self._draw_projections(shapes)
        return all(
            torch.equal(getattr(self, f"left_{i}").cpu(), left)
            and torch.equal(getattr(self, f"right_{i}").cpu(), right)
            for i, (left, right) in enumerate(redrawn)
        )

    def _draw_projections(self, shapes: list[torch.Size]) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        rows_of_w, columns_of_w = self.factors
        scale = 1.0 / math.sqrt(sum(math.prod(shape) for shape in shapes))
        for shape in shapes:
            numel = math.prod(shape)
            rows = math.ceil(math.sqrt(numel))
            columns = math.ceil(numel / rows)
            left = torch.randn(rows, rows_of_w, generator=generator) * scale
            right = torch.randn(columns, columns_of_w, generator=generator)
            yield left, right


class _Displaced(nn.Module):
    """The parametrization ``theta0 -> theta0 + P_i w`` of one parameter."""

    def __init__(self, subspace: RandomSubspace, index: int) -> None:
        super().__init__()
        self.subspace, self.index = subspace, index

    def forward(self, original: Tensor) -> Tensor:
        return original + self.subspace.offset(self.index).view_as(original).to(original.dtype)


def to_subspace(module: nn.Module, dimension: int, seed: int = 0) -> RandomSubspace:
    """Re-draw ``module``'s parameters from ``seed`` and train it from now on only through ``w`` (``dimension``).

    Every parameter must belong to a submodule with ``reset_parameters`` (Linear, Conv, norms, ...), so
    that ``theta0`` is a function of the seed; otherwise this raises, naming the parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> subspace = to_subspace(net, dimension=10, seed=0)
        >>> [name for name, p in net.named_parameters() if p.requires_grad]
        ['0.parametrizations.weight.0.subspace.weight']
        >>> net(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """
    if find_subspace(module) is not None:
        raise ValueError("The module is already trained in a random subspace.")
    _reset_from_seed(module, seed)
    named = list(module.named_parameters())
    subspace = RandomSubspace([parameter.shape for _, parameter in named], dimension, seed).to(named[0][1].device)
    for index, (name, _) in enumerate(named):
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        parametrize.register_parametrization(owner, attribute, _Displaced(subspace, index), unsafe=True)
        getattr(owner.parametrizations, attribute).original.requires_grad_(False)
    return subspace


def find_subspace(module: nn.Module) -> RandomSubspace | None:
    """The :class:`RandomSubspace` that ``module`` is trained in, if any."""
    return next((m for m in module.modules() if isinstance(m, RandomSubspace)), None)


def _reset_from_seed(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter with its module's ``reset_parameters`` under ``seed``; check it covers all."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(math.nan)
        with preserved_rng():
            torch.manual_seed(seed)
            for submodule in module.modules():
                if callable(getattr(submodule, "reset_parameters", None)):
                    submodule.reset_parameters()
    untouched = [name for name, parameter in module.named_parameters() if torch.isnan(parameter).any()]
    if untouched:
        raise ValueError(
            f"Parameters {untouched} don't belong to a module with `reset_parameters`, so `theta0` can't be drawn "
            "from the seed. Move them into a module that defines `reset_parameters`, or train without a subspace."
        )
