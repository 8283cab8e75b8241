"""The training loss of any LightningModule, computed outside Lightning's loop.

Capabilities that need the loss at points of their own choosing (a Hessian-vector product, a
GradInit look-ahead step) call :func:`training_loss`. It uses the user's ``loss_fn`` when given,
otherwise the module's own ``training_step`` with ``self.log``/``self.log_dict`` muted and every
torchmetrics state restored afterwards, so nothing is logged or counted twice. One that needs every
example's loss asks :func:`example_losses` for the user's own ``[B]`` vector first.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torchmetrics import Metric

from lightning_nt.common.batches import batch_size

__all__ = [
    "LogSink",
    "LossFn",
    "captured_logging",
    "example_losses",
    "frozen_attributes",
    "frozen_metrics",
    "loss_from_output",
    "muted_logging",
    "training_loss",
    "training_step_output",
    "validation_step_output",
]

LossFn = Callable[[pl.LightningModule, Any], Tensor]
"""``loss_fn(pl_module, batch) -> scalar Tensor``: the loss a capability differentiates."""

_METRIC_BOOKKEEPING = ("_update_count", "_computed", "_forward_cache")


def training_loss(
    pl_module: pl.LightningModule,
    batch: Any,
    batch_idx: int = 0,
    loss_fn: LossFn | None = None,
    *,
    restore_attributes: bool = True,
) -> Tensor:
    """Return the scalar training loss of ``pl_module`` on ``batch``, with no side effect on logs, metrics or (with
    ``restore_attributes``, :func:`frozen_attributes`) the module's own attributes. Turn that off where hooks keep
    per-step state on the module for the backward pass that follows (Opacus's per-sample hooks).

    Examples:
        >>> from pytorch_lightning.demos.boring_classes import BoringModel
        >>> model = BoringModel()
        >>> training_loss(model, torch.randn(4, 32)).ndim
        0
    """
    if loss_fn is not None:
        return loss_from_output(loss_fn(pl_module, batch), source="loss_fn")
    if not pl_module.automatic_optimization:
        raise RuntimeError(
            f"{type(pl_module).__name__} uses manual optimization, so its training_step steps the optimizer "
            "itself and its loss can't be read from it. Pass `loss_fn=lambda pl_module, batch: <scalar loss>` "
            "to the callback."
        )
    with frozen_attributes(pl_module) if restore_attributes else contextlib.nullcontext():
        output = training_step_output(pl_module, batch, batch_idx)
    return loss_from_output(output, source=f"{type(pl_module).__name__}.training_step")


def training_step_output(pl_module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> Any:
    """What ``pl_module.training_step`` returns on ``batch`` (with or without ``batch_idx`` in its signature), with
    logging muted and torchmetrics states as they were: for a caller that needs more than the scalar loss (the
    per-example losses a DP engine clips).

    Examples:
        >>> from pytorch_lightning.demos.boring_classes import BoringModel
        >>> sorted(training_step_output(BoringModel(), torch.randn(4, 32)))
        ['loss']
    """
    return _step_output(pl_module.training_step, pl_module, batch, batch_idx)


def validation_step_output(pl_module: pl.LightningModule, batch: Any, batch_idx: int = 0) -> Any:
    """What ``pl_module.validation_step`` returns on ``batch`` of the first validation loader (``batch_idx`` passed
    where its signature has it, ``dataloader_idx=0`` where it has no default), with logging muted and torchmetrics
    states and the module's own attributes as they were: a forward pass computed as validation computes it.

    Examples:
        >>> from pytorch_lightning.demos.boring_classes import BoringModel
        >>> sorted(validation_step_output(BoringModel(), torch.randn(4, 32)))
        ['x']
    """
    with frozen_attributes(pl_module):
        return _step_output(pl_module.validation_step, pl_module, batch, batch_idx)


def _step_output(step: Callable[..., Any], pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
    loader_index = inspect.signature(step).parameters.get("dataloader_idx")
    with muted_logging(pl_module), frozen_metrics(pl_module):
        if loader_index is not None and loader_index.default is inspect.Parameter.empty:
            return step(batch, batch_idx, 0)
        if is_param_in_hook_signature(step, "batch_idx", min_args=2):
            return step(batch, batch_idx)
        return step(batch)


def example_losses(pl_module: pl.LightningModule, batch: Any, loss_fn: LossFn | None) -> Tensor | None:
    """``loss_fn``'s own per-example losses on ``batch`` (shape ``[B]``), or None when it gives no such vector.

    None when there is no ``loss_fn`` or it returns a scalar (a mean): the caller then takes
    :func:`training_loss` of one-example batches (vectorised, e.g. with ``torch.func.vmap``).

    Examples:
        >>> from pytorch_lightning.demos.boring_classes import BoringModel
        >>> model, batch = BoringModel(), torch.randn(4, 32)
        >>> example_losses(model, batch, lambda module, batch: module(batch).sum(1)).shape
        torch.Size([4])
        >>> example_losses(model, batch, lambda module, batch: module(batch).sum()) is None
        True
    """
    if loss_fn is None:
        return None
    losses = loss_fn(pl_module, batch)
    return losses if isinstance(losses, Tensor) and losses.shape == (batch_size(batch),) else None


def loss_from_output(output: Any, source: str) -> Tensor:
    """Extract the scalar loss from what ``training_step`` (or a ``loss_fn``) returned.

    A Tensor or a mapping with a ``"loss"`` entry is accepted; a per-example loss of shape ``[B]`` is averaged.
    """
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"{source} returned {type(output).__name__}; a loss Tensor or a dict with a 'loss' Tensor is needed. "
            "If training_step skips some batches by returning None, pass `loss_fn=` to the callback."
        )
    if loss.ndim > 1:
        raise ValueError(f"{source} returned a loss of shape {tuple(loss.shape)}; a scalar or a [B] vector is needed.")
    return loss.mean() if loss.ndim == 1 else loss


LogSink = Callable[[str, Any, dict[str, Any]], None]
"""Receives ``(name, value, keyword arguments)`` for every ``self.log`` call (and each entry of ``log_dict``)."""


@contextmanager
def captured_logging(pl_module: pl.LightningModule, sink: LogSink | None = None) -> Iterator[None]:
    """Route ``pl_module.log``/``log_dict`` to ``sink`` (or nowhere) for the block instead of Lightning."""
    shadowed = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if sink is not None:
            sink(name, value, _keywords(_LOG, (name, value, *args), kwargs))

    def log_dict(dictionary: Any, *args: Any, **kwargs: Any) -> None:
        options = _keywords(_LOG_DICT, (dictionary, *args), kwargs)
        for name, value in dictionary.items():
            log(name, value, **options)

    pl_module.log = log  # type: ignore[method-assign]
    pl_module.log_dict = log_dict  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in shadowed:
                setattr(pl_module, name, shadowed[name])
            else:
                delattr(pl_module, name)


_LOG = inspect.signature(pl.LightningModule.log)
_LOG_DICT = inspect.signature(pl.LightningModule.log_dict)


def _keywords(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The options of a ``log``/``log_dict`` call by name, positional ones included (``log_dict(d, False, False)``)."""
    bound = signature.bind_partial(None, *args, **kwargs).arguments
    return {name: value for name, value in bound.items() if name not in ("self", "name", "value", "dictionary")}


def muted_logging(pl_module: pl.LightningModule) -> contextlib.AbstractContextManager[None]:
    """Turn ``pl_module.log`` and ``pl_module.log_dict`` into no-ops for the duration of the block."""
    return captured_logging(pl_module, sink=None)


@contextmanager
def frozen_metrics(module: torch.nn.Module) -> Iterator[None]:
    """Restore the state of every torchmetrics ``Metric`` inside ``module`` when the block ends."""
    saved = [(metric, _metric_state(metric)) for metric in module.modules() if isinstance(metric, Metric)]
    try:
        yield
    finally:
        for metric, state in saved:
            for name, value in state.items():
                setattr(metric, name, value)


@contextmanager
def frozen_attributes(pl_module: pl.LightningModule) -> Iterator[None]:
    """Put the module's own attributes back as they were when the block ends: an attribute set or added inside it
    is set back or removed, and the contents of a list, dict, set or deque it holds are restored in place. A step
    run for a measurement then leaves no trace in the module (Lightning's ``self.validation_step_outputs.append``
    pattern, a flag or tensor a step keeps); Lightning's and PyTorch's own attributes are left alone.

    Examples:
        >>> from pytorch_lightning.demos.boring_classes import BoringModel
        >>> model = BoringModel()
        >>> model.outputs = []
        >>> with frozen_attributes(model):
        ...     model.outputs.append(1)
        ...     model.seen = True
        >>> model.outputs, hasattr(model, "seen")
        ([], False)
    """
    internals = _lightning_internals()
    saved = {name: (value, _contents(value)) for name, value in vars(pl_module).items() if name not in internals}
    try:
        yield
    finally:
        for name in [name for name in vars(pl_module) if name not in internals and name not in saved]:
            del pl_module.__dict__[name]
        for name, (value, contents) in saved.items():
            pl_module.__dict__[name] = value
            if contents is not None:
                _restore_contents(value, contents)


@functools.cache
def _lightning_internals() -> frozenset[str]:
    return frozenset(vars(pl.LightningModule()))


def _contents(value: Any) -> Any:
    if isinstance(value, list | collections.deque):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, set):
        return set(value)
    return None


def _restore_contents(value: Any, contents: Any) -> None:
    if isinstance(value, list):
        value[:] = contents
    elif isinstance(value, dict | set):
        value.clear()
        value.update(contents)
    else:  # a deque
        value.clear()
        value.extend(contents)


def _metric_state(metric: Metric) -> dict[str, Any]:
    state = {name: _clone(getattr(metric, name)) for name in metric._defaults}
    state.update({name: copy.copy(getattr(metric, name)) for name in _METRIC_BOOKKEEPING if hasattr(metric, name)})
    return state


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_clone(item) for item in value]
    return copy.deepcopy(value)
