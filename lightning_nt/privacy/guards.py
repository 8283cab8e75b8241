"""Checks that make DP-SGD fail closed: settings that would break the guarantee are refused before a release.

Each check raises (or, where the accounting can be made honest, warns once) with what is wrong and the fix:

* the Trainer: precision, gradient accumulation (also turned on mid-run), Trainer clipping, manual optimization;
* the callbacks: Lightning's tuners (they train through the DP optimizer, then roll the ledger back with their
  checkpoint), accumulation and fine-tuning schedules, and every callback that declares it reads the training
  data outside the training step (:func:`~lightning_nt.common.capabilities.reads_training_data_outside_step`);
* the module (:mod:`~lightning_nt.privacy.module_guards`): what the engines can't clip, and a training step that
  writes into the module's own state;
* the optimizer: closure-driven ones (LBFGS) that evaluate the loss several times per step;
* the train loader: a user's sampler or batch sampler, whose sampling the accounting can't describe;
* a checkpoint's ledger: consistent with the loop's own step count.

What no check can prove absent (documented in ``docs/privacy-guarantee.md``): coupling between examples written by
hand in ``forward`` or ``training_step`` (e.g. ``x - x.mean(0)``). :mod:`~lightning_nt.privacy.independence` looks
for it, and for layers that mix the examples, on a fit's first batch; :func:`check_sensitivity` measures it on one
batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.connectors.data_connector import _parse_num_batches
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from lightning_nt.common import copied, frozen_attributes, map_examples, select_examples, training_loss
from lightning_nt.common.capabilities import reads_training_data_outside_step
from lightning_nt.common.flavours import lightning_classes

__all__ = [
    "check_accumulation",
    "check_callbacks",
    "check_ledger",
    "check_optimizer",
    "check_train_loader",
    "check_trainer",
    "planned_steps",
]

_ALLOWED_PRECISION = ("32-true", "32", "bf16-mixed")
_LOADER_SAMPLERS = (SequentialSampler, RandomSampler, DistributedSampler)  # what DataLoader/Lightning put there


def check_trainer(trainer: pl.Trainer) -> None:
    """Refuse Trainer settings under which the noisy update is not what the accounting assumes."""
    if trainer.precision not in _ALLOWED_PRECISION:
        reason = (
            "Opacus rewrites the gradients after the fp16 GradScaler, which then scales the noisy update wrongly"
            if trainer.precision.startswith("16")
            else "the clipping engines form, clip and noise the per-example gradients in fp32, so the run would not "
            "be the training in that precision that it asks for"
        )
        raise RuntimeError(
            f"DP-SGD can't run with precision={trainer.precision!r}: {reason}. Use precision='32-true' or 'bf16-mixed'."
        )
    check_accumulation(trainer)
    if trainer.gradient_clip_val:
        raise RuntimeError(
            "The Trainer's gradient_clip_val clips the noisy averaged gradient, not each example's: remove it and "
            "set the strategy's max_grad_norm instead."
        )
    if not trainer.lightning_module.automatic_optimization:
        raise RuntimeError("DP-SGD needs automatic optimization: the strategy steps the DP optimizer itself.")


def check_accumulation(trainer: pl.Trainer) -> None:
    """Refuse gradient accumulation (also when a callback such as ``GradientAccumulationScheduler`` turns it on
    mid-run: checked before every private step): several Poisson batches in one noisy update raise the real sample
    rate above the accounted one."""
    if trainer.accumulate_grad_batches != 1:
        raise RuntimeError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} breaks Poisson sampling's accounting; "
            "use a larger batch (sample rate) instead."
        )


def check_callbacks(trainer: pl.Trainer, allow_nonprivate: bool) -> None:
    """Refuse tuners, accumulation schedules and fine-tuning schedules always; refuse (or, with
    ``allow_nonprivate``, warn about) callbacks that read the training data."""
    tuners = [
        type(c).__name__
        for c in trainer.callbacks
        if isinstance(c, lightning_classes("callbacks.LearningRateFinder", "callbacks.BatchSizeFinder"))
    ]
    if tuners:
        raise RuntimeError(
            f"{', '.join(tuners)} can't run under DP-SGD: it trains through the DP optimizer, chooses from "
            "un-noised training losses, then restores its checkpoint, which drops its noisy steps from the privacy "
            "ledger. Tune on public data (or a non-private run on other data) and pass the values explicitly."
        )
    for callback in trainer.callbacks:
        if isinstance(callback, lightning_classes("callbacks.GradientAccumulationScheduler")) and set(
            callback.scheduling.values()
        ) != {1}:
            raise RuntimeError(
                f"GradientAccumulationScheduler({callback.scheduling}) accumulates gradients under DP-SGD, which "
                "breaks Poisson sampling's accounting: remove it and use a larger batch (sample rate) instead."
            )
        if isinstance(callback, lightning_classes("callbacks.BaseFinetuning")):
            raise RuntimeError(
                f"{type(callback).__name__} changes which parameters train during a private fit, but the DP engine "
                "clips the parameters that require grad when the fit starts: remove it and run one `fit` per "
                "stage of the fine-tuning (freeze or unfreeze between them)."
            )
    readers = [type(c).__name__ for c in trainer.callbacks if reads_training_data_outside_step(c)]
    if not readers:
        return
    message = (
        f"{', '.join(readers)} compute(s) on the training data outside DP-SGD, so what they log or change is "
        "not covered by the privacy guarantee"
    )
    if not allow_nonprivate:
        raise RuntimeError(f"{message}. Remove them, or pass allow_nonprivate_callbacks=True to accept that.")
    rank_zero_warn(f"{message} (allow_nonprivate_callbacks=True).")


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers that re-evaluate the loss inside ``step`` (each evaluation would be another release)."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise RuntimeError(
            "LBFGS can't run under DP-SGD: it evaluates the loss and gradient several times per step through a "
            "closure, and each evaluation would need its own noise and accounting. Use SGD, Adam or AdamW."
        )


def check_train_loader(dataloader: DataLoader, sample_rate: float | None) -> None:
    """Refuse a loader whose rate ``q`` can't be derived; warn once when a user's sampling is replaced."""
    custom_batches = dataloader.batch_sampler is not None and type(dataloader.batch_sampler) is not BatchSampler
    if sample_rate is None and (custom_batches or not dataloader.batch_size):
        what = type(dataloader.batch_sampler).__name__ if custom_batches else "batch_size=None"
        raise RuntimeError(
            f"The train loader draws its batches with {what}, so DP-SGD can't derive the sample rate q from its "
            "batch size. Pass DPStrategy(sample_rate=q) (the expected batch over the dataset size); the batches "
            "are then drawn by Poisson sampling at that rate."
        )
    replaced = dataloader.batch_sampler if custom_batches else dataloader.sampler
    if custom_batches or type(replaced) not in _LOADER_SAMPLERS:
        rank_zero_warn(
            f"DP-SGD replaces the train loader's {type(replaced).__name__} by Poisson sampling: every example is in "
            "every batch independently with the rate q, which is what the privacy accounting assumes (the weights, "
            "order or buckets of the replaced sampler are not used)."
        )


def planned_steps(trainer: pl.Trainer, steps_per_epoch: int | None) -> int:
    """The optimizer steps the Trainer will really run (``max_steps``, ``max_epochs`` and ``limit_train_batches``)."""
    plans = []
    if trainer.max_steps is not None and trainer.max_steps > 0:
        plans.append(trainer.max_steps)
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and steps_per_epoch:
        per_epoch = _parse_num_batches(RunningStage.TRAINING, steps_per_epoch, trainer.limit_train_batches)
        plans.append(trainer.max_epochs * int(per_epoch))
    if not plans:
        raise RuntimeError("target_epsilon needs a finite plan: set the Trainer's max_steps or max_epochs.")
    return min(plans)


def check_ledger(saved: dict[str, Any], checkpoint: dict[str, Any], steps: int) -> None:
    """Refuse a checkpoint whose ledger doesn't account for every optimizer step its loop says it took.

    Every optimizer step is one noisy release, except the one step a budget stop skips; so the ledger's steps
    plus the skipped steps must equal the checkpoint's ``global_step``.
    """
    skipped = int(saved.get("skipped_steps", 0))
    global_step = int(checkpoint.get("global_step", steps + skipped))
    if steps + skipped != global_step:
        raise RuntimeError(
            f"The checkpoint's privacy ledger records {steps} noisy steps (+{skipped} skipped at the budget) but "
            f"its loop took {global_step} optimizer steps: the ledger was edited or is from another run, and "
            "epsilon would be under-reported. Resume from an unmodified checkpoint of this run."
        )


CANARY_SCALE = 100.0


def check_sensitivity(
    module: pl.LightningModule,
    optimizer: Any,
    batch: Any,
    batch_idx: int,
    max_grad_norm: float,
    prepare: Callable[[Any], Any] = lambda batch: batch,
) -> float:
    """Measure, on one batch, how far one example moves the clipped sum; refuse if it is more than ``max_grad_norm``.

    The batch's first example is made a canary (its floating-point inputs scaled by 100) and the clipped sums with
    and without it are compared. Per-example clipping bounds that distance by ``C`` only if every example's
    gradient depends on that example alone; coupling written by hand (``x - x.mean(0)`` in ``forward``, a loss
    over pairs) moves the other examples' gradients too. Nothing is released: the gradients are dropped, the
    module's logging and metrics are muted. One batch can't prove the absence of coupling, only find it.
    ``prepare`` turns a batch into what ``training_step`` takes (augmented views are flattened after the canary
    is made, so that the canary is a whole example).

    Returns the measured distance (at most ``max_grad_norm`` when it returns).
    """
    canary = map_examples(batch, lambda t: torch.cat([t[:1] * CANARY_SCALE, t[1:]]) if t.is_floating_point() else t)
    sums = []
    for probe in (canary, select_examples(canary, slice(1, None))):
        with torch.enable_grad(), frozen_attributes(module):  # the module's attributes kept until after the backward
            loss = training_loss(module, prepare(copied(probe)), batch_idx, restore_attributes=False)
            loss.backward()  # (a step may change its batch in place: a copy)
        sums.append(_clipped_sum(optimizer, max_grad_norm))
        optimizer.clear_per_example_state()
        for p in module.parameters():
            p.grad = None
    distance = float((sums[0] - sums[1]).norm())
    if not distance <= max_grad_norm * (1 + 1e-3):
        raise RuntimeError(
            f"sensitivity_probe: one example moved the clipped gradient sum by {distance:.4g}, more than "
            f"max_grad_norm={max_grad_norm:g}: the examples of a batch are coupled (e.g. `x - x.mean(0)` in forward, "
            "a loss over pairs, BatchNorm-like code), so DP-SGD's guarantee does not hold for this module. Make "
            "every example's loss depend on that example alone."
        )
    return distance


def _clipped_sum(optimizer: Any, max_grad_norm: float) -> torch.Tensor:
    optimizer.zero_for_unused_parameters()
    samples = optimizer.per_example_gradients()
    flat = torch.cat([s.flatten(1) for s in samples], dim=1)
    factors = (max_grad_norm / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
    return factors @ flat
