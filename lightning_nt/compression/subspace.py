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
import functools
import math
import random
from collections.abc import Callable, Collection, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from lightning_nt.common.compiled import with_own_methods
from lightning_nt.common.layers import reparametrized_modules
from lightning_nt.common.state import preserved_rng
from lightning_nt.common.validation import at_least, between, checked_arguments, non_empty, renamed_attributes

__all__ = [
    "DIMENSION_RULE",
    "SEED_RULE",
    "Initializer",
    "RandomSubspace",
    "detached_deepcopy",
    "find_subspace",
    "seeded_initialization",
    "subspace_mismatches",
    "subspace_originals",
    "to_subspace",
]

__getattr__ = renamed_attributes(globals(), seeded_initialisation="seeded_initialization")  # deprecated spelling


DIMENSION_RULE = at_least(1)
"""A subspace has at least one coordinate."""

SEED_RULE = between(0, 2**32 - 1)
"""The seed is sent in 32 bits."""

Initializer = Callable[[nn.Module], None]
"""Initialises one module's own parameters in place (e.g. a Hugging Face model's ``_init_weights``)."""


class RandomSubspace(nn.Module):
    """The trainable coordinates ``w`` and the seeded projection of a module trained in a subspace.

    Args:
        shapes: the shapes of the displaced parameters, in order (``P`` has one block of rows per shape).
        dimension: ``d``, the number of coordinates of ``w``.
        seed: draws ``P`` (32 bits).

    Examples:
        >>> subspace = RandomSubspace([torch.Size([3, 2]), torch.Size([3])], dimension=4, seed=0)
        >>> subspace.offset(0).shape
        torch.Size([6])
    """

    @checked_arguments(shapes=non_empty(), dimension=DIMENSION_RULE, seed=SEED_RULE)
    def __init__(self, shapes: Sequence[Sequence[int]], dimension: int, seed: int) -> None:
        super().__init__()
        self.dimension, self.seed = dimension, seed
        self.initializer: Initializer | None = None  # what drew theta0 besides the modules' reset_parameters
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

    def _draw_projections(self, shapes: Sequence[Sequence[int]]) -> Iterator[tuple[Tensor, Tensor]]:
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


@checked_arguments(dimension=DIMENSION_RULE, seed=SEED_RULE)
def to_subspace(
    module: nn.Module, dimension: int, seed: int = 0, initializer: Initializer | None = None
) -> RandomSubspace:
    """Re-draw ``module``'s trainable parameters from ``seed`` and train them from now on only through ``w``.

    ``theta0`` is what each submodule's ``reset_parameters`` (or ``_reset_parameters``, as
    ``nn.MultiheadAttention`` has) draws under ``seed`` on the CPU, or ``initializer`` where given (see
    :func:`seeded_initialization`), so a decoder that knows the architecture, the initialiser and the seed rebuilds
    it: any pretrained or custom initialisation of a trainable parameter is replaced. Without ``initializer`` every
    trainable parameter must belong to a submodule with such a method; otherwise this raises, naming the parameter,
    and leaves the module untouched.

    Parameters the user froze (``requires_grad=False``, e.g. a pretrained backbone) are left out of the subspace:
    they keep their values and are not trained (a compression bound must then encode them). A parameter shared by
    several modules (tied embedding and output weights) stays shared: every module that holds it sees the same
    ``theta0 + P w``.

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
    parametrized = reparametrized_modules(module)
    if parametrized:
        raise ValueError(
            f"Modules {parametrized} already carry parametrizations (e.g. weight_norm, or the older weight_norm/"
            "spectral_norm hooks); a random subspace needs plain parameters. Remove the parametrizations first."
        )
    lazy = [name for name, p in module.named_parameters() if is_lazy(p)]
    if lazy:
        raise ValueError(
            f"Parameters {lazy} are not materialised yet (a lazy module such as nn.LazyLinear): their shapes are "
            "unknown until the first forward pass. Run the module once on an example batch (e.g. in its __init__) "
            "before training it in a subspace."
        )
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            "The module has no trainable parameter (all have `requires_grad=False`) to train in a subspace."
        )
    paths = _paths_of(module)
    names = [path for _, p in trainable for path in paths[id(p)]]
    theta0 = seeded_initialization(module, seed, names=names, initializer=initializer)
    if initializer is not None:
        _refuse_draws_the_seed_does_not_make(module, seed, names, initializer, theta0)
    with torch.no_grad():
        for name, parameter in trainable:
            parameter.copy_(theta0[name])
    subspace = RandomSubspace([p.shape for _, p in trainable], dimension, seed)
    subspace.initializer = initializer
    subspace.to(device=trainable[0][1].device, dtype=trainable[0][1].dtype)  # a float64 module trains w in float64
    for index, (_, parameter) in enumerate(trainable):
        for path in paths[id(parameter)]:  # every module holding a shared parameter: ties survive
            owner_name, _, attribute = path.rpartition(".")
            owner = module.get_submodule(owner_name)
            parametrize.register_parametrization(owner, attribute, _Displaced(subspace, index), unsafe=True)
        parameter.requires_grad_(False)
    return subspace


def _refuse_draws_the_seed_does_not_make(
    module: nn.Module, seed: int, names: list[str], initializer: Initializer, theta0: dict[str, Tensor]
) -> None:
    """Refuse an ``initializer`` that sets a parameter to values that are neither constant nor drawn from the seed
    (copied pretrained weights, a draw from a generator of its own): the bound's code has only the seed to rebuild
    ``theta0`` from, so those values would be information it does not count. Found by drawing with another seed."""
    other = seeded_initialization(module, (seed + 1) % 2**32, names=names, initializer=initializer)
    fixed = [
        name
        for name, value in theta0.items()
        if torch.equal(value, other[name]) and bool((value != value.flatten()[0]).any())
    ]
    if fixed:
        raise ValueError(
            f"`initializer` sets {fixed} to values that don't change with the seed and aren't constant (copied "
            "pretrained weights, a generator of its own): a compression bound's code rebuilds theta0 from the seed "
            "alone, so it would not count them. Draw them from torch's (or Python's, NumPy's) global generator, or "
            "freeze them (`requires_grad_(False)`: they then stay outside the subspace and are encoded as they are)."
        )


def _paths_of(module: nn.Module) -> dict[int, list[str]]:
    """Every name under which each parameter (by ``id``) is reachable: several for a shared parameter."""
    paths: dict[int, list[str]] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        paths.setdefault(id(parameter), []).append(name)
    return paths


def find_subspace(module: nn.Module) -> RandomSubspace | None:
    """The :class:`RandomSubspace` that ``module`` is trained in, if any."""
    return next((m for m in module.modules() if isinstance(m, RandomSubspace)), None)


def seeded_initialization(
    module: nn.Module, seed: int, names: Collection[str] | None = None, initializer: Initializer | None = None
) -> dict[str, Tensor]:
    """The parameters ``module``'s own initialisers draw under ``seed``, computed on a CPU float32 copy (the draw does
    not depend on the precision the module is trained in: ``precision="64-true"`` converts it after the draw).

    The initializer of a submodule is its ``reset_parameters``, or ``_reset_parameters`` where it has only that
    (``nn.MultiheadAttention``, ``nn.Transformer``). They run children first, then their parent, as the modules'
    constructors do (``nn.MultiheadAttention`` zeroes its ``out_proj.bias`` after the ``nn.Linear`` drew it).
    With ``initializer`` (a function of one module, e.g. a Hugging Face model's ``_init_weights``), it runs instead,
    on every submodule, children first, as ``module.apply(initializer)`` would, and nothing else runs: it serves
    layers without ``reset_parameters`` (``transformers``' ``Conv1D``, a bare parameter of the model itself). Python's
    and NumPy's generators are seeded with ``seed`` too, so an initializer that draws from them is reproducible.
    Subspace parametrizations on the copy are undone first, so the result is keyed by the plain names
    (``0.weight``; every name of a shared parameter) whether or not ``module`` is already trained in a subspace.
    With ``names``, only modules that own one of those parameters (or none at all) are re-drawn: the others
    (frozen, or added after the draw) were absent from it. ``module`` is not changed.
    """
    plain = _plain_copy(module).float()
    wanted = set(names) if names is not None else {name for name, _ in plain.named_parameters()}
    with torch.no_grad():
        for name, parameter in plain.named_parameters(remove_duplicate=False):
            if name in wanted:
                parameter.fill_(math.nan)
        with preserved_rng():
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            for owner_name, owner in _children_first(plain):
                own = {f"{owner_name}.{n}" if owner_name else n for n, _ in owner.named_parameters(recurse=False)}
                draw = _initializer(owner, initializer)
                if draw is not None and (initializer is not None or not own or own & wanted):
                    draw()
    drawn = {name: p.detach() for name, p in plain.named_parameters(remove_duplicate=False) if name in wanted}
    untouched = [name for name, parameter in drawn.items() if torch.isnan(parameter).any()]
    if untouched and initializer is not None:
        raise ValueError(
            f"`initializer` left parameters {untouched} (or some of their entries) undrawn: it must set every "
            "parameter of each module it is given. Extend it to those modules' types, or freeze them "
            "(`requires_grad_(False)`: they then stay outside the subspace)."
        )
    if untouched:
        raise ValueError(
            f"Parameters {untouched} don't belong to a module with `reset_parameters`, so `theta0` can't be drawn "
            "from the seed. Give `initializer` (a function that initialises one module, e.g. a Hugging Face "
            "model's `_init_weights`), move them into a module that defines `reset_parameters`, freeze them "
            "(`requires_grad_(False)`: they then stay outside the subspace), or train without a subspace."
        )
    return drawn


def _initializer(module: nn.Module, initializer: Initializer | None) -> Callable[[], None] | None:
    """What draws ``module``'s own parameters: ``initializer`` applied to it, or its ``(_)reset_parameters``."""
    if initializer is not None:
        return functools.partial(initializer, module)
    for attribute in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, attribute, None)
        if callable(method):
            return method
    return None


def _children_first(
    module: nn.Module, prefix: str = "", seen: set[int] | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` in post-order: every submodule (once) before the module that contains it."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    for name, child in module.named_children():
        yield from _children_first(child, f"{prefix}.{name}" if prefix else name, seen)
    yield prefix, module


def _plain_copy(module: nn.Module) -> nn.Module:
    """A CPU copy of ``module`` with every parametrization undone (its ``original`` as the plain parameter).

    ``parametrize.remove_parametrizations`` would edit the parametrized class, which the copy shares with
    ``module``; here only the copy's instances change. A parameter shared by several modules stays shared.
    """
    plain = detached_deepcopy(module).cpu()
    plain_parameters: dict[int, nn.Parameter] = {}
    for owner in list(plain.modules()):
        if parametrize.is_parametrized(owner):
            originals = {name: group.original for name, group in owner.parametrizations.items()}
            del owner._modules["parametrizations"]
            owner.__class__ = owner.__class__.__bases__[0]
            for name, original in originals.items():
                if id(original) not in plain_parameters:
                    plain_parameters[id(original)] = nn.Parameter(original.detach().clone())
                owner.register_parameter(name, plain_parameters[id(original)])
    return plain


def detached_deepcopy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)``, also when a submodule caches tensors computed with autograd.

    ``nn.LSTM`` keeps its weights in ``_flat_weights``; once they are parametrized (a subspace), those are non-leaf
    tensors, which ``copy.deepcopy`` refuses. Such cached tensors are copied detached (the copy's next forward
    recomputes them anyway). Methods Lightning compiled in place (``trainer.fit(torch.compile(module))``) would
    run the original module: the copy runs its own.
    """
    memo: dict[int, object] = {}
    for submodule in module.modules():
        for value in vars(submodule).values():
            for item in value if isinstance(value, list | tuple) else (value,):
                if isinstance(item, Tensor) and item.grad_fn is not None:
                    memo[id(item)] = item.detach().clone()
    return with_own_methods(copy.deepcopy(module, memo))


def subspace_mismatches(module: nn.Module) -> list[str]:
    """Names of the tensors a decoder would rebuild differently from the seed: ``theta0`` or the projections.

    Empty when the module is exactly ``theta0(seed) + P(seed) w``, e.g. not after loading a checkpoint
    trained with another seed into it.
    """
    subspace = find_subspace(module)
    if subspace is None:
        return []
    originals = dict(subspace_originals(module))
    drawn = seeded_initialization(module, subspace.seed, names=originals, initializer=subspace.initializer)
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
