"""Re-run the user's validation with whatever weights the module holds now, and collect what it logs.

A capability that compares two sets of weights (iterate averaging against the raw iterate) needs the
user's own validation metrics for the second set without a second Lightning validation loop. This
runs ``validation_step`` over the Trainer's validation batches with logging captured, and every
torchmetrics state and random generator restored afterwards, reducing values the way Lightning
does for ``on_epoch`` logging: Tensors by a batch-size-weighted mean, torchmetrics objects by
``compute()``. Under DDP the means are reduced over ranks, and metrics synchronise themselves.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.signature_utils import is_param_in_hook_signature
from torchmetrics import Metric

from lightning_nt.common.batches import batch_size
from lightning_nt.common.loss import captured_logging, frozen_metrics
from lightning_nt.common.probe import prepare_batch, preserved_loader_rng

__all__ = ["validation_metrics"]


@torch.no_grad()
def validation_metrics(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """The values ``pl_module.validation_step`` logs over the Trainer's validation batches, reduced per name."""
    dataloaders = trainer.val_dataloaders
    if dataloaders is None:
        return {}
    dataloaders = dataloaders if isinstance(dataloaders, list | tuple) else [dataloaders]
    limits = trainer.num_val_batches
    sums: dict[str, list[float]] = {}
    metrics: dict[str, Metric] = {}
    current_size = 1

    def record(name: str, value: Any, kwargs: dict[str, Any]) -> None:
        if isinstance(value, Metric):
            metrics[name] = value
            return
        weight = kwargs.get("batch_size") or current_size
        total = sums.setdefault(name, [0.0, 0.0])
        total[0] += float(value) * weight
        total[1] += weight

    pass_index = is_param_in_hook_signature(pl_module.validation_step, "dataloader_idx", min_args=3)
    with frozen_metrics(pl_module), captured_logging(pl_module, record):
        for metric in pl_module.modules():
            if isinstance(metric, Metric):
                metric.reset()
        for dataloader_idx, dataloader in enumerate(dataloaders):
            with preserved_loader_rng(dataloader):
                for batch_idx, batch in enumerate(dataloader):
                    if batch_idx >= limits[dataloader_idx]:
                        break
                    batch = prepare_batch(trainer, batch)
                    current_size = batch_size(batch)
                    extra = (dataloader_idx,) if pass_index and len(dataloaders) > 1 else ()
                    with trainer.precision_plugin.val_step_context():
                        pl_module.validation_step(batch, batch_idx, *extra)
        values = {name: _mean_over_ranks(trainer, total) for name, total in sums.items()}
        values.update({name: float(metric.compute()) for name, metric in metrics.items()})
    return values


def _mean_over_ranks(trainer: pl.Trainer, total: list[float]) -> float:
    totals = torch.tensor(total, dtype=torch.float64, device=trainer.strategy.root_device)
    if trainer.world_size > 1:
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
    return float(totals[0] / totals[1])
