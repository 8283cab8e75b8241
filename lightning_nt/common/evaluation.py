"""Re-run the user's validation with whatever weights the module holds now, and collect what it logs.

A capability that compares two sets of weights (iterate averaging against the raw iterate) needs the
user's own validation metrics for the second set without a second Lightning validation loop. This
runs ``validation_step`` over the Trainer's validation batches with logging captured, and every
torchmetrics state and random generator restored afterwards. What ``self.log`` receives goes into a
result collection of Lightning's own kind, with the logging levels Lightning gives ``validation_step``,
so every value is reduced as Lightning reduces it (``reduce_fx`` "mean" weighted by batch size, "max",
"min", "sum"; torchmetrics objects by ``compute()``; ``sync_dist`` over ranks), named as Lightning
names it (``name/dataloader_idx_k`` with several loaders, ``name_epoch`` when also logged on step) and
sent where Lightning sends it (``logger=False`` keeps a value out of the loggers).
The result collection and the logging-level defaults are Lightning internals; re-implementing them would drift
from Lightning silently, using them fails loudly if they change, and ``tests/averaging/test_raw_metrics.py``
compares the outcome with Lightning's own ``callback_metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.trainer.connectors.logger_connector.fx_validator import _FxValidator
from pytorch_lightning.trainer.connectors.logger_connector.result import _ResultCollection
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torchmetrics import Metric

from lightning_nt.common.loss import captured_logging, frozen_metrics
from lightning_nt.common.probe import prepare_batch, preserved_loader_rng

__all__ = ["ValidationMetrics", "validation_metrics"]

_STEP = "validation_step"


@dataclass(frozen=True)
class ValidationMetrics:
    """The epoch values of one validation, as Lightning would report them.

    Attributes:
        callback: what Lightning puts in ``trainer.callback_metrics`` (every value, also ``logger=False`` ones).
        logged: what Lightning sends to the loggers: the values logged with ``logger=True`` (the default), a
            value also logged on step as ``name_epoch`` only. A subset of ``callback``.
    """

    callback: dict[str, float]
    logged: dict[str, float]


@torch.no_grad()
def validation_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> ValidationMetrics:
    """The epoch values ``pl_module.validation_step`` logs over the Trainer's validation batches, reduced per name.

    Keys and values are those Lightning reports after validating the same weights (see :class:`ValidationMetrics`).
    """
    dataloaders = trainer.val_dataloaders
    if dataloaders is None:
        return ValidationMetrics({}, {})
    dataloaders = dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]
    several = len(dataloaders) > 1
    results = _ResultCollection(training=False)

    def record(name: str, value: Any, kwargs: dict[str, Any]) -> None:
        _log_into(results, trainer, pl_module, name, value, kwargs)

    pass_index = is_param_in_hook_signature(pl_module.validation_step, "dataloader_idx", min_args=3)
    values = ValidationMetrics({}, {})
    with frozen_metrics(pl_module), captured_logging(pl_module, record):
        for metric in pl_module.modules():
            if isinstance(metric, Metric):
                metric.reset()
        for dataloader_idx, dataloader in enumerate(dataloaders):
            results.dataloader_idx = dataloader_idx if several else None
            limit = trainer.num_val_batches[dataloader_idx]
            _run_loader(trainer, pl_module, results, dataloader, limit, dataloader_idx, pass_index and several)
            # as Lightning does, a loader's values are computed when it ends (a metric shared by loaders is not reset)
            metrics = results.metrics(on_step=False)
            values.callback.update({name: float(value) for name, value in metrics["callback"].items()})
            values.logged.update({name: float(value) for name, value in metrics["log"].items()})
    return values


def _run_loader(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    results: _ResultCollection,
    dataloader: Any,
    limit: int | float,
    dataloader_idx: int,
    pass_index: bool,
) -> None:
    extra = (dataloader_idx,) if pass_index else ()
    with preserved_loader_rng(dataloader):
        for batch_idx, batch in enumerate(dataloader):
            if batch_idx >= limit:
                break
            batch = prepare_batch(trainer, batch, dataloader_idx)
            results.batch, results.batch_size = batch, None
            with trainer.precision_plugin.val_step_context():
                pl_module.validation_step(batch, batch_idx, *extra)


def _log_into(
    results: _ResultCollection,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    name: str,
    value: Any,
    kwargs: dict[str, Any],
) -> None:
    """What ``LightningModule.log`` does with a value in ``validation_step``, into ``results``."""
    on_step, on_epoch = _FxValidator.check_logging_and_get_default_levels(
        _STEP, on_step=kwargs.get("on_step"), on_epoch=kwargs.get("on_epoch")
    )
    value = apply_to_collection(value, (Tensor, float, int), _to_tensor, pl_module.device)
    logger = kwargs.get("logger")
    results.log(
        _STEP,
        name,
        value,
        prog_bar=bool(kwargs.get("prog_bar", False)),
        logger=True if logger is None else bool(logger),  # as LightningModule.log: None means True
        on_step=on_step,
        on_epoch=on_epoch,
        reduce_fx=kwargs.get("reduce_fx", "mean"),
        add_dataloader_idx=kwargs.get("add_dataloader_idx", True),
        batch_size=kwargs.get("batch_size"),
        sync_dist=bool(kwargs.get("sync_dist", False)) and trainer.world_size > 1,
        sync_dist_fn=trainer.strategy.reduce,
        sync_dist_group=kwargs.get("sync_dist_group"),
        metric_attribute=kwargs.get("metric_attribute"),
        rank_zero_only=kwargs.get("rank_zero_only", False),
    )


def _to_tensor(value: Tensor | float, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().clone().squeeze()
    return torch.tensor(value, device=device, dtype=torch.float32)
