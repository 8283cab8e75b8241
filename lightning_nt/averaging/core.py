"""Iterate averaging without Lightning: fp32 running means and EMAs of a module's weights.

:class:`RunningWeightAverage` keeps, by name, an fp32 average of every floating parameter (and, if asked, every
floating buffer). A non-finite iterate (NaN or inf anywhere) is skipped and counted rather than folded in. Off CUDA,
an update is one fused multi-tensor kernel per dtype group after a finiteness check read on the host, with the
update weight computed from a Python counter. On CUDA it never reads the device from the host (that read would make
the CPU wait for every kernel the training step queued): the finiteness flag, the counts and the update weight are
tensors on the device, and a non-finite iterate is replaced by the average tensor by tensor before the update, so
the average stays bit for bit what it was. Integer buffers (``num_batches_tracked``) are copied, never averaged.
:meth:`RunningWeightAverage.swapped_in` evaluates a module with the average and gives the raw weights back bitwise,
also when the block raises, without a deep copy of the module.

The two modes are one recursion ``avg <- avg + w_t (x - avg)``:

* ``uniform`` (Gadam / SWA tail average): ``w_t = 1 / (t + 1)``, so ``avg`` is the plain mean of the
  ``t + 1`` iterates seen;
* ``ema``: ``w_t = 1 - decay_t`` with ``decay_t = decay`` or, with warm-up power ``p``,
  ``min(decay, 1 - (1 + t) ** -p)`` (timm's schedule), so early iterates don't dominate.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_nt.common.compiled import renamed_state_dict
from lightning_nt.common.state import preserved_modes
from lightning_nt.common.validation import Rule, above, at_least, between, checked_arguments, renamed_attributes

__all__ = [
    "AveragingMode",
    "RunningWeightAverage",
    "decay_per_update",
    "load_averaged_weights",
    "recompute_batchnorm",
    "save_averaged_weights",
    "torch_device",
]

AveragingMode = Literal["uniform", "ema"]

__getattr__ = renamed_attributes(globals(), IterateAverage="RunningWeightAverage")  # the 0.1 name, deprecated


def torch_device() -> Rule:
    """Rule: a string or ``torch.device`` that ``torch.device`` accepts (``"cpu"``, ``"cuda:0"``)."""

    def valid(value: torch.device | str) -> bool:
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            return False
        return True

    return Rule(valid, "a torch device such as 'cpu' or 'cuda:0'")


@checked_arguments(
    decay=between(0.0, 1.0, low_open=True, high_open=True), half_life=above(0.0), every_n_steps=at_least(1)
)
def decay_per_update(decay: float | None = None, half_life: float | None = None, every_n_steps: int = 1) -> float:
    """EMA decay of one update made every ``every_n_steps`` steps, from a per-step ``decay`` or a ``half_life``.

    Keeps the time constant in optimizer steps: ``decay ** every_n_steps``, or ``0.5 ** (every_n_steps / half_life)``
    so an iterate's weight halves every ``half_life`` steps (Composer's convention).

    Examples:
        >>> decay_per_update(half_life=10, every_n_steps=10)
        0.5
    """
    if (decay is None) == (half_life is None):
        raise ValueError("Give exactly one of `decay` and `half_life`.")
    if half_life is not None:
        return 0.5 ** (every_n_steps / half_life)
    return decay**every_n_steps


class RunningWeightAverage:
    """fp32, name-keyed running average of a module's floating weights.

    Args:
        module: the module whose parameters (and buffers, with ``buffers=True``) are averaged.
        mode: ``"uniform"`` (plain mean of all updates) or ``"ema"``.
        decay: EMA decay per update (required for ``"ema"``).
        warmup: EMA warm-up power ``p``: the decay of update ``t`` is ``min(decay, 1 - (1 + t) ** -p)``.
        buffers: also average floating buffers (e.g. BatchNorm running statistics); integer buffers are copied.
        device: where the averages live (default: beside each parameter).

    :meth:`update` skips an iterate with a NaN or infinite weight (counted in :attr:`n_skipped`), so one bad step
    never poisons a uniform average. On CUDA it never reads the device from the host: the finiteness flag, the
    update weight and the counts stay on the GPU, and only reading :attr:`n_averaged`, :attr:`n_skipped`,
    :attr:`state` or :meth:`state_dict` waits for the queued updates. The update plan caches references to the
    module's tensors: call :meth:`release` when training ends so the average holds no reference to the module.

    Examples:
        >>> net = nn.Linear(2, 1)
        >>> average = RunningWeightAverage(net, mode="uniform")
        >>> for value in (1.0, 2.0, 6.0):
        ...     _ = nn.init.constant_(net.weight, value)
        ...     _ = average.update(net)
        >>> average.state["weight"]
        tensor([[3., 3.]])
    """

    _device_path: bool | None = None  # None: counts on the device on CUDA only; the tests force either path on the CPU

    @checked_arguments(decay=between(0.0, 1.0, low_open=True, high_open=True), warmup=above(0.0), device=torch_device())
    def __init__(
        self,
        module: nn.Module,
        mode: AveragingMode = "uniform",
        decay: float | None = None,
        warmup: float | None = None,
        buffers: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        if mode == "ema" and decay is None:
            raise ValueError("`decay` is needed for mode='ema': a number in (0, 1), e.g. decay=0.999.")
        self.mode, self.decay, self.warmup, self.buffers, self.device = mode, decay, warmup, buffers, device
        self._n_averaged: int | Tensor = 0  # a tensor on the device once updates run there (see `_on_device`)
        self._n_skipped: int | Tensor = 0
        self._state: dict[str, Tensor] = {}
        self._plan: (
            tuple[weakref.ref[nn.Module], list[tuple[list[Tensor], list[Tensor]]], list[tuple[Tensor, Tensor]]] | None
        ) = None
        self._averaged_names = [name for name, tensor in self._named_tensors(module) if tensor.is_floating_point()]
        self._copied_names = [name for name, tensor in self._named_tensors(module) if not tensor.is_floating_point()]

    def weight(self, t: int) -> float:
        """Weight ``w_t`` of the iterate in update number ``t`` (0-based)."""
        if self.mode == "uniform":
            return 1.0 / (t + 1)
        assert self.decay is not None
        decay = self.decay if self.warmup is None else min(self.decay, 1.0 - (1.0 + t) ** -self.warmup)
        return 1.0 - decay

    @property
    def n_averaged(self) -> int:
        """Number of iterates folded into the average (on CUDA, reading it waits for the queued updates)."""
        return int(self._n_averaged)

    @property
    def n_skipped(self) -> int:
        """Number of iterates left out because a weight was NaN or infinite (read like :attr:`n_averaged`)."""
        return int(self._n_skipped)

    @property
    def state(self) -> dict[str, Tensor]:
        """The averages by name (fp32 for floating tensors); empty before the first finite iterate."""
        return self._state if self.n_averaged else {}

    @torch.no_grad()
    def update(self, module: nn.Module) -> bool | Tensor:
        """Fold the module's current weights into the average, unless one of them is NaN or infinite.

        Returns whether the iterate was folded in: a ``bool`` where the averages live off CUDA; on CUDA a 0-dim
        boolean tensor on the device, so that the update never waits for the GPU (``bool()`` of it does). A
        non-finite iterate leaves the average unchanged, bit for bit, and is counted in :attr:`n_skipped`.
        """
        if self._on_device(module):
            return self._update_on_device(module)
        if not self._state:
            tensors = dict(self._named_tensors(module))
            if not _all_finite([tensors[name] for name in self._averaged_names]):
                self._n_skipped += 1
                return False
            self._state = {
                name: tensors[name].detach().to(self.device, torch.float32, copy=True) for name in self._averaged_names
            }
            self._state.update({name: tensors[name].detach().to(self.device, copy=True) for name in self._copied_names})
        else:
            groups, copies = self._plan_for(module)
            if not _all_finite([iterate for _, iterates in groups for iterate in iterates]):
                self._n_skipped += 1
                return False
            weight = self.weight(self.n_averaged)
            for averages, iterates in groups:
                if iterates[0].device != averages[0].device:
                    iterates = [iterate.to(averages[0].device) for iterate in iterates]
                _lerp_(averages, iterates, weight)
            for average, tensor in copies:
                average.copy_(tensor)
        self._n_averaged += 1
        return True

    def _on_device(self, module: nn.Module) -> bool:
        """Whether updates keep the finiteness flag and the counts on the device: on CUDA (a host read would make the
        CPU wait for every kernel the step queued), not on the CPU, where waiting costs nothing."""
        first = next(iter(self._named_tensors(module)), None)
        if first is None:  # nothing to average, nothing to wait for
            return False
        if self._device_path is not None:
            return self._device_path
        if self.device is not None:
            return torch.device(self.device).type == "cuda"
        return first[1].is_cuda

    def _update_on_device(self, module: nn.Module) -> Tensor:
        """:meth:`update` without a host read: the count and the flag stay tensors on the averages' device.

        The averages start at zero with weight 1 for the first iterate (an exact copy of it); a non-finite iterate
        is replaced by the average tensor by tensor before the update (``NaN * 0`` is NaN), with the count left as
        it is, so the average stays bit for bit what it was.
        """
        if not self._state:
            self._start_on_device(module)
        groups, copies = self._plan_for(module)
        device = next(iter(self._state.values())).device
        self._n_averaged, self._n_skipped = _count_on(device, self._n_averaged), _count_on(device, self._n_skipped)
        finite = _all_finite_on(device, [group for _, group in groups])
        weight = torch.where(finite, self._weight_on_device(self._n_averaged), 0.0)
        for averages, group in groups:
            _lerp_selected_(averages, group, weight, finite)
        for average, tensor in copies:
            average.copy_(torch.where(finite, tensor.to(device), average))
        self._n_averaged = self._n_averaged + finite
        self._n_skipped = self._n_skipped + ~finite
        return finite

    def _start_on_device(self, module: nn.Module) -> None:
        tensors = dict(self._named_tensors(module))
        self._state = {
            name: torch.zeros_like(tensors[name], dtype=torch.float32, device=self.device or tensors[name].device)
            for name in self._averaged_names
        }
        self._state.update({name: tensors[name].detach().to(self.device, copy=True) for name in self._copied_names})

    def _weight_on_device(self, t: Tensor) -> Tensor:
        """:meth:`weight` of update ``t`` computed on the device in float64, as the host computes it in Python."""
        t = t.double()
        if self.mode == "uniform":
            return 1.0 / (t + 1.0)
        assert self.decay is not None
        decay = torch.full_like(t, self.decay)
        if self.warmup is not None:
            decay = torch.minimum(decay, 1.0 - (1.0 + t) ** -self.warmup)
        return torch.where(t == 0, 1.0, 1.0 - decay)  # the first iterate is copied, as on the host

    def release(self) -> None:
        """Drop the cached update plan, the only reference the average keeps to the module's tensors."""
        self._plan = None

    def _plan_for(
        self, module: nn.Module
    ) -> tuple[list[tuple[list[Tensor], list[Tensor]]], list[tuple[Tensor, Tensor]]]:
        """(average, iterate) tensor lists grouped by the iterate's device and dtype, built once per module."""
        if self._plan is None or self._plan[0]() is not module:
            tensors = dict(self._named_tensors(module))
            groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
            for name in self._averaged_names:
                group = groups.setdefault((tensors[name].device, tensors[name].dtype), ([], []))
                group[0].append(self._state[name])
                group[1].append(tensors[name])
            copies = [(self._state[name], tensors[name]) for name in self._copied_names]
            self._plan = (weakref.ref(module), list(groups.values()), copies)
        return self._plan[1], self._plan[2]

    @contextmanager
    def swapped_in(self, module: nn.Module) -> Iterator[dict[str, Tensor]]:
        """Load the average into ``module`` for the block; the raw weights come back bitwise afterwards.

        Buffers that are not averaged are left as they are, and restored too, so the block may recompute them.
        The block receives the saved raw tensors by name (parameters and buffers), to read, not to change.
        """
        if not self.state:
            raise RuntimeError("The average is empty: call `update` at least once before swapping it in.")
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        raw = {name: tensor.detach().clone() for name, tensor in tensors.items()}
        try:
            self.copy_to(module)
            yield raw
        finally:
            with torch.no_grad():
                for name, tensor in tensors.items():
                    tensor.copy_(raw[name])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the average into the module's own tensors (cast to their dtype and device)."""
        tensors = dict(self._named_tensors(module))
        for name, average in self.state.items():
            tensors[name].copy_(average)

    def state_dict(self) -> dict[str, Any]:
        return {"n_averaged": self.n_averaged, "n_skipped": self.n_skipped, "average": dict(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._n_averaged = int(state["n_averaged"])
        self._n_skipped = int(state.get("n_skipped", 0))
        self._plan = None
        self._state = {
            name: tensor.to(self.device) if self.device else tensor for name, tensor in state["average"].items()
        }

    def to(self, device: torch.device | str) -> None:
        """Move the averages (e.g. after loading a checkpoint on the CPU)."""
        self._state = {name: tensor.to(device) for name, tensor in self._state.items()}
        if isinstance(self._n_averaged, Tensor):
            self._n_averaged, self._n_skipped = self.n_averaged, self.n_skipped
        self._plan = None

    def _named_tensors(self, module: nn.Module) -> Iterable[tuple[str, Tensor]]:
        yield from module.named_parameters()
        if self.buffers:
            yield from module.named_buffers()


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite: one reduction per tensor and one host read per device.

    A finite total proves every element finite (NaN and inf propagate); a non-finite one may also be an overflow
    of finite weights, so it is confirmed element by element. On a GPU the totals are norms (one fused kernel for
    all tensors); on a CPU plain sums, which read the weights about three times faster than norms there.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    return all(_finite_on_one_device(group) for group in by_device.values())


def _finite_on_one_device(tensors: list[Tensor]) -> bool:
    totals = torch._foreach_norm(tensors) if tensors[0].is_cuda else [tensor.sum() for tensor in tensors]
    if bool(torch.stack([total.float() for total in totals]).isfinite().all()):
        return True
    return all(bool(torch.isfinite(tensor).all()) for tensor in tensors)


def _count_on(device: torch.device, count: int | Tensor) -> Tensor:
    """A count as a 0-dim int64 tensor on ``device``, made there by a fill (a copy from the host would wait)."""
    if isinstance(count, Tensor):
        return count
    return torch.full((), count, dtype=torch.int64, device=device)


def _all_finite_on(device: torch.device, groups: list[list[Tensor]]) -> Tensor:
    """Whether every element of every tensor is finite, as a 0-dim boolean tensor on ``device`` (no host read).

    Per group of tensors sharing a device and dtype, one fused largest-magnitude reduction (``_foreach_norm`` with
    ``ord=inf``): exact, since NaN and inf propagate through it and the largest magnitude of finite numbers is
    finite (no overflow, unlike a norm or a sum, to confirm element by element). Empty tensors are finite.
    """
    groups = [[tensor for tensor in group if tensor.numel()] for group in groups]  # no maximum of nothing
    flags = [
        torch.stack(torch._foreach_norm(group, ord=math.inf)).isfinite().all().to(device, non_blocking=True)
        for group in groups
        if group
    ]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


def _lerp_selected_(averages: list[Tensor], iterates: list[Tensor], weight: Tensor, finite: Tensor) -> None:
    """:func:`_lerp_` with a device-side ``weight`` (0 for a non-finite iterate), tensor by tensor.

    Each iterate is first replaced by its average where ``finite`` is false (``NaN * 0`` is NaN, so a zero weight
    alone would not keep the average): one temporary the size of one tensor at a time, never a copy of the model.
    Same arithmetic as :func:`_lerp_`: ``lerp_`` for equal dtypes, a scale and a scaled add for fp32 averages of
    bf16/fp16 weights.
    """
    dtype = averages[0].dtype
    same_dtype = iterates[0].dtype == dtype
    if not same_dtype:
        torch._foreach_mul_(averages, (1.0 - weight).to(dtype))
    weight = weight.to(dtype)
    for average, iterate in zip(averages, iterates):
        selected = torch.where(finite, iterate.to(average.device, non_blocking=True), average)
        if same_dtype:
            average.lerp_(selected, weight)
        else:
            average.addcmul_(selected, weight)


def _lerp_(averages: list[Tensor], iterates: list[Tensor], weight: float) -> None:
    if iterates[0].dtype == averages[0].dtype:
        torch._foreach_lerp_(averages, iterates, weight)
    else:  # lerp needs equal dtypes; fp32 averages of bf16/fp16 weights take a scaled add
        torch._foreach_mul_(averages, 1.0 - weight)
        torch._foreach_add_(averages, iterates, alpha=weight)


@torch.no_grad()
def recompute_batchnorm(
    module: nn.Module, forward_passes: Iterable[Any], training_modes: Mapping[str, bool] | None = None
) -> None:
    """Reset every BatchNorm's running statistics and recompute them as a plain mean over ``forward_passes``.

    ``forward_passes`` is consumed for its side effect: each item must run one forward pass of ``module``
    (e.g. a generator calling the module's training step). Same statistics as
    ``torch.optim.swa_utils.update_bn`` on the same batches, for any way of calling the module.

    Every other buffer (a step counter or a running mean that the module's forward pass updates) is left as it was.

    ``training_modes``: the ``training`` flag of each submodule (by name) while the module trained. The passes then
    run in those modes, and only the BatchNorms that trained in training mode are recomputed: one kept in eval mode
    (a frozen, pre-trained backbone) never changed its running statistics, which the average keeps. ``None``: every
    submodule in training mode, every BatchNorm recomputed.

    Examples:
        >>> net = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> modes = {"": True, "0": False, "1": True, "2": True}  # the first BatchNorm is kept in eval mode
        >>> recompute_batchnorm(net, (net(torch.randn(4, 2)) for _ in range(3)), modes)
        >>> net[0].running_mean.tolist(), int(net[2].num_batches_tracked)
        ([0.0, 0.0], 3)
    """
    names = dict(module.named_modules())
    norms = [
        m
        for name, m in names.items()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and (training_modes is None or training_modes.get(name, True))
    ]
    if not norms:
        return
    recomputed = {id(buffer) for norm in norms for buffer in norm.buffers()}
    others = [(buffer, buffer.clone()) for buffer in module.buffers() if id(buffer) not in recomputed]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    with preserved_modes(module):
        module.train()
        for name, training in (training_modes or {}).items():
            if name in names:
                names[name].training = training
        try:
            for _ in forward_passes:
                pass
        finally:
            for norm, momentum in zip(norms, momenta):
                norm.momentum = momentum
            for buffer, value in others:  # state the forward pass keeps (a step counter) is not the statistics'
                buffer.copy_(value)


def save_averaged_weights(averaged_state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Save averaged weights (``IterateAveraging.averaged_state_dict()``) for use without a Trainer."""
    torch.save({name: tensor.detach().cpu() for name, tensor in averaged_state_dict.items()}, path)


@torch.no_grad()
def load_averaged_weights(module: nn.Module, path: str | Path, strict: bool = True) -> list[str]:
    """Copy averaged weights saved by :func:`save_averaged_weights` into ``module``; return names not found.
    Names match without the ``_orig_mod.`` of a submodule compiled with ``torch.compile`` on either side.

    Examples:
        >>> import tempfile, os
        >>> net = nn.Linear(2, 1)
        >>> file = os.path.join(tempfile.mkdtemp(), "averaged.pt")
        >>> save_averaged_weights({"weight": torch.ones(1, 2), "bias": torch.zeros(1)}, file)
        >>> load_averaged_weights(net, file), net.weight.tolist()
        ([], [[1.0, 1.0]])
    """
    saved = renamed_state_dict(module, torch.load(path, map_location="cpu", weights_only=True))
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    unknown = sorted(set(saved) - set(tensors))
    missing = sorted(name for name, _ in module.named_parameters() if name not in saved)
    if strict and (unknown or missing):
        raise KeyError(
            f"Averaged weights don't match the module: unknown {unknown}, missing parameters {missing}. "
            "Pass strict=False to load the names that match."
        )
    for name, tensor in saved.items():
        if name in tensors:
            tensors[name].copy_(tensor)
    return missing
