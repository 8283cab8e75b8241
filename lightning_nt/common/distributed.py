"""Cross-rank reductions: the one way a capability combines what every process measured.

Under data parallelism (DDP) each process measures on its own share of the data; a capability then
sums, averages, gathers or broadcasts through the functions here, so every rank logs the same numbers
and takes the same decisions. They go through ``trainer.strategy`` (Lightning's own collectives, so any
strategy Lightning supports works) and do nothing with one process: no tensor is made, no collective runs.
(The DP strategy, being the strategy, calls its own ``reduce``/``broadcast`` directly.)

Values may be tensors (reduced in place, as ``torch.distributed.all_reduce`` does, and returned), lists of
tensors (one collective each), Python numbers (carried as a float64 or int64 tensor on
``trainer.strategy.root_device``, so NCCL gets a CUDA tensor, and handed back as a number), or dicts of
Python floats. A dict is reduced key by key over the union of the ranks' keys (agreed on with one
``all_gather_object`` of the key lists, then one collective for the values): a key a rank lacks, or holds as NaN
or inf, is left out of that key's sum or mean (the sum, or the mean, of the finite values), and a key no rank has
a finite value for comes back NaN. So ranks whose measurements differ in which values they hold stay in lockstep.

Examples:
    >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    >>> mean_across_ranks(trainer, {"sharpness/lambda_max": 12.5})  # one process: the value itself
    {'sharpness/lambda_max': 12.5}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, TypeVar

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_nt.common.flavours import lightning_classes

__all__ = [
    "broadcast_from_rank_zero",
    "check_unsharded",
    "gather_across_ranks",
    "mean_across_ranks",
    "min_across_ranks",
    "sum_across_ranks",
]

Reducible = TypeVar("Reducible", Tensor, float, list[Tensor], dict[str, float])
"""What :func:`sum_across_ranks` and :func:`mean_across_ranks` take and give back (of the same kind)."""

Number = TypeVar("Number", int, float)

Broadcast = TypeVar("Broadcast")


SHARDED_STRATEGIES = ("strategies.FSDPStrategy", "strategies.DeepSpeedStrategy", "strategies.ModelParallelStrategy")
"""Strategies that split the parameters over the processes (by their path in a Lightning package)."""


def check_unsharded(trainer: pl.Trainer, owner: str) -> None:
    """Refuse a strategy that shards the parameters over the processes (FSDP, DeepSpeed, ModelParallel).

    A capability reads the module's whole parameters on every process (Hessian-vector products, rescaling,
    averages, compression, kernels) and restores them exactly: on one shard that would measure, change or restore
    part of a different model. Lightning's own ``StochasticWeightAveraging`` refuses them too.

    Examples:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> check_unsharded(trainer, "SharpnessMonitor")  # one device: nothing to refuse
    """
    if isinstance(trainer.strategy, lightning_classes(*SHARDED_STRATEGIES)):
        raise RuntimeError(
            f"{owner} does not support {type(trainer.strategy).__name__}, which shards the parameters over the "
            f"processes: {owner} reads and restores the whole module on every process. Train with "
            "strategy='ddp' (the parameters whole on every process) to use it, or remove it."
        )


def sum_across_ranks(trainer: pl.Trainer, value: Reducible) -> Reducible:
    """The sum over all processes of ``value`` (a tensor, list of tensors, float or dict of floats), on every rank.

    Examples:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> sum_across_ranks(trainer, [torch.ones(2)])
        [tensor([1., 1.])]
    """
    return _reduce(trainer, value, "sum")


def mean_across_ranks(trainer: pl.Trainer, value: Reducible) -> Reducible:
    """The mean over all processes of ``value`` (a tensor, list of tensors, float or dict of floats), on every rank.

    Examples:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> mean_across_ranks(trainer, 0.25)
        0.25
    """
    return _reduce(trainer, value, "mean")


def gather_across_ranks(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Every process's ``tensor`` concatenated along dimension 0 in rank order, on every rank.

    Each rank's tensor must have the same shape (cut rows to :func:`min_across_ranks` of the row counts first).

    Examples:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> gather_across_ranks(trainer, torch.arange(3)).tolist()
        [0, 1, 2]
    """
    if trainer.world_size == 1:
        return tensor
    return trainer.strategy.all_gather(tensor.contiguous()).flatten(0, 1)


def min_across_ranks(trainer: pl.Trainer, value: Number) -> Number:
    """The smallest ``value`` (a Python int or float) over all processes, on every rank.

    Examples:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> min_across_ranks(trainer, 16)
        16
    """
    if trainer.world_size == 1:
        return value
    gathered = trainer.strategy.all_gather(_number_tensor(trainer, value))
    return type(value)(gathered.min().item())


def broadcast_from_rank_zero(trainer: pl.Trainer, value: Broadcast) -> Broadcast:
    """Rank 0's ``value`` (any picklable object) on every rank: for a choice one process makes for all.

    Examples:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> broadcast_from_rank_zero(trainer, 2**61 + 1)  # exact: an int is pickled, not cast to a float
        2305843009213693953
    """
    if trainer.world_size == 1:
        return value
    return trainer.strategy.broadcast(value, src=0)


def _reduce(trainer: pl.Trainer, value: Any, op: Literal["sum", "mean"]) -> Any:
    if trainer.world_size == 1:
        return value
    if isinstance(value, Tensor):
        return trainer.strategy.reduce(value, reduce_op=op)
    if isinstance(value, Mapping):
        return _reduce_finite_values(trainer, value, op)
    if isinstance(value, int | float):
        return float(_reduce(trainer, _number_tensor(trainer, float(value)), op))
    if isinstance(value, list | tuple):
        return [_reduce(trainer, tensor, op) for tensor in value]
    raise TypeError(
        f"Can't reduce a {type(value).__name__} across ranks: pass a Tensor, a list of Tensors, a float or a dict "
        "of floats."
    )


def _reduce_finite_values(trainer: pl.Trainer, values: Mapping[str, float], op: Literal["sum", "mean"]) -> dict:
    """Key by key over the union of the ranks' keys: the sum, or mean, of the ranks' finite values (NaN if none)."""
    keys = _union_of_keys(trainer, list(values))
    if not keys:
        return {}
    local = torch.tensor([values.get(key, math.nan) for key in keys], dtype=torch.float64)
    finite = local.isfinite()
    stacked = torch.cat([torch.where(finite, local, 0.0), finite.double()]).to(trainer.strategy.root_device)
    sums, counts = trainer.strategy.reduce(stacked, reduce_op="sum").cpu().split(len(keys))
    reduced = torch.where(counts > 0, sums / counts.clamp_min(1) if op == "mean" else sums, math.nan)
    return dict(zip(keys, reduced.tolist()))


def _union_of_keys(trainer: pl.Trainer, keys: list[str]) -> list[str]:
    """Every key any rank holds, in the same order on every rank (rank 0's first, then the others' new ones).

    Through ``torch.distributed`` (every Lightning strategy for CPUs and GPUs); with processes that don't use it
    the ranks must hold the same keys."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return keys
    gathered: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, keys)
    return list(dict.fromkeys(key for rank_keys in gathered for key in rank_keys))


def _number_tensor(trainer: pl.Trainer, value: float) -> Tensor:
    dtype = torch.int64 if isinstance(value, int) else torch.float64
    return torch.tensor(value, dtype=dtype, device=trainer.strategy.root_device)
