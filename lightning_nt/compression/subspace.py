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

import copy
import math
from collections.abc import Collection, Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_nt.common.state import preserved_rng

__all__ = [
    "RandomSubspace",
    "check_subspace_arguments",
    "find_subspace",
    "seeded_initialisation",
    "subspace_mismatches",
    "subspace_originals",
    "to_subspace",
]


class RandomSubspace(nn.Module):
    """The trainable coordinates ``w`` and the seeded projection of a module trained in a subspace."""

    def __init__(self, shapes: list[torch.Size], dimension: int, seed: int) -> None:
        super().__init__()
        check_subspace_arguments(dimension, seed)
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
        """Whether the projection buffers are exactly what the seed draws (in their current dtype)."""
        shapes = [torch.Size([n]) for n in self._numels]
        redrawn = self._draw_projections(shapes)
        return all(
            _equal(getattr(self, f"left_{i}"), left) and _equal(getattr(self, f"right_{i}"), right)
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

    ``theta0`` is what each submodule's ``reset_parameters`` draws under ``seed`` on the CPU (see
    :func:`seeded_initialisation`), so a decoder that knows the architecture and the seed rebuilds it: any
    pretrained or custom initialisation is replaced. Every parameter must belong to a submodule with
    ``reset_parameters``; otherwise this raises, naming the parameter, and leaves the module untouched.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> subspace = to_subspace(net, dimension=10, seed=0)
        >>> [name for name, p in net.named_parameters() if p.requires_grad]
        ['0.parametrizations.weight.0.subspace.weight']
        >>> net(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
    """
    if find_subspace(module) is not None:
        raise ValueError("The module is already trained in a random subspace.")
    parametrized = [name for name, m in module.named_modules() if parametrize.is_parametrized(m)]
    if parametrized:
        raise ValueError(
            f"Modules {parametrized} already carry parametrizations (e.g. weight_norm); a random subspace needs "
            "plain parameters. Remove the parametrizations first."
        )
    theta0 = seeded_initialisation(module, seed)
    named = list(module.named_parameters())
    with torch.no_grad():
        for name, parameter in named:
            parameter.copy_(theta0[name])
    subspace = RandomSubspace([parameter.shape for _, parameter in named], dimension, seed).to(named[0][1].device)
    for index, (name, _) in enumerate(named):
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        parametrize.register_parametrization(owner, attribute, _Displaced(subspace, index), unsafe=True)
        getattr(owner.parametrizations, attribute).original.requires_grad_(False)
    return subspace


def check_subspace_arguments(dimension: int, seed: int) -> None:
    """``ValueError`` naming ``dimension`` or ``seed`` when a subspace can't have them (the seed is sent in 32 bits)."""
    if dimension < 1:
        raise ValueError(f"`dimension` must be >= 1, got {dimension}.")
    if not 0 <= seed < 2**32:
        raise ValueError(f"`seed` must be in [0, 2**32), got {seed}.")


def find_subspace(module: nn.Module) -> RandomSubspace | None:
    """The :class:`RandomSubspace` that ``module`` is trained in, if any."""
    return next((m for m in module.modules() if isinstance(m, RandomSubspace)), None)


def seeded_initialisation(module: nn.Module, seed: int, names: Collection[str] | None = None) -> dict[str, Tensor]:
    """The parameters ``module``'s own ``reset_parameters`` draw under ``seed``, computed on a CPU copy.

    Subspace parametrizations on the copy are undone first, so the result is keyed by the plain names
    (``0.weight``) whether or not ``module`` is already trained in a subspace. With ``names``, modules that
    own parameters but none of those (added after the draw) are left out, as they were absent from it.
    ``module`` is not changed.
    """
    plain = _plain_copy(module)
    wanted = set(names) if names is not None else {name for name, _ in plain.named_parameters()}
    with torch.no_grad():
        for name, parameter in plain.named_parameters():
            if name in wanted:
                parameter.fill_(math.nan)
        with preserved_rng():
            torch.manual_seed(seed)
            for owner_name, owner in plain.named_modules():
                own = {f"{owner_name}.{n}" if owner_name else n for n, _ in owner.named_parameters(recurse=False)}
                if callable(getattr(owner, "reset_parameters", None)) and (not own or own & wanted):
                    owner.reset_parameters()
    drawn = {name: p.detach() for name, p in plain.named_parameters() if name in wanted}
    untouched = [name for name, parameter in drawn.items() if torch.isnan(parameter).any()]
    if untouched:
        raise ValueError(
            f"Parameters {untouched} don't belong to a module with `reset_parameters`, so `theta0` can't be drawn "
            "from the seed. Move them into a module that defines `reset_parameters`, or train without a subspace."
        )
    return drawn


def _plain_copy(module: nn.Module) -> nn.Module:
    """A CPU copy of ``module`` with every parametrization undone (its ``original`` as the plain parameter).

    ``parametrize.remove_parametrizations`` would edit the parametrized class, which the copy shares with
    ``module``; here only the copy's instances change.
    """
    plain = copy.deepcopy(module).cpu()
    for owner in list(plain.modules()):
        if parametrize.is_parametrized(owner):
            originals = {name: group.original for name, group in owner.parametrizations.items()}
            del owner._modules["parametrizations"]
            owner.__class__ = owner.__class__.__bases__[0]
            for name, original in originals.items():
                owner.register_parameter(name, nn.Parameter(original.detach().clone()))
    return plain


def subspace_mismatches(module: nn.Module) -> list[str]:
    """Names of the tensors a decoder would rebuild differently from the seed: ``theta0`` or the projections.

    Empty when the module is exactly ``theta0(seed) + P(seed) w``, e.g. not after loading a checkpoint
    trained with another seed into it.
    """
    subspace = find_subspace(module)
    if subspace is None:
        return []
    originals = dict(subspace_originals(module))
    drawn = seeded_initialisation(module, subspace.seed, names=originals)
    mismatched = [] if subspace.projections_match_seed() else ["projection P"]
    return mismatched + [name for name, original in originals.items() if not _equal(original, drawn[name])]


def subspace_originals(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(plain name, theta0 tensor)`` of every parameter the subspace displaces."""
    for owner_name, owner in module.named_modules():
        if not parametrize.is_parametrized(owner):
            continue
        for attribute, parametrizations in owner.parametrizations.items():
            if any(isinstance(p, _Displaced) for p in parametrizations):
                yield (f"{owner_name}.{attribute}" if owner_name else attribute), parametrizations.original


def _equal(tensor: Tensor, reference: Tensor) -> bool:
    """Bitwise equality with a CPU float32 draw, after casting it as Lightning would (``bf16-true``, devices)."""
    return torch.equal(tensor.detach().cpu(), reference.to(tensor.dtype))
