"""Checks that make DP-SGD fail closed: settings that would break the guarantee are refused before a release.

Each check raises (or, where the accounting can be made honest, warns once) with what is wrong and the fix:

* the Trainer: precision, gradient accumulation (also turned on mid-run), Trainer clipping, manual optimization;
* the callbacks: Lightning's tuners (they train through the DP optimizer, then roll the ledger back with their
  checkpoint), accumulation and fine-tuning schedules, and every callback that declares it reads the training
  data outside the training step (:func:`~lightning_nt.common.capabilities.reads_training_data_outside_step`);
* the module: BatchNorm and what Opacus can't give per-example gradients for, parametrized modules (also by
  the old ``weight_norm``/``spectral_norm`` hooks);
* the optimizer: closure-driven ones (LBFGS) that evaluate the loss several times per step;
* the train loader: a user's sampler or batch sampler, whose sampling the accounting can't describe;
* a checkpoint's ledger: consistent with the loop's own step count.

What no check can see (documented in ``docs/privacy-guarantee.md``): coupling between examples written by hand
in ``forward`` or ``training_step`` (e.g. ``x - x.mean(0)``). :func:`sensitivity_probe` measures it on one batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from opacus.validators import ModuleValidator
from pytorch_lightning.callbacks import (
    BaseFinetuning,
    BatchSizeFinder,
    GradientAccumulationScheduler,
    LearningRateFinder,
)
from pytorch_lightning.trainer.connectors.data_connector import _parse_num_batches
from pytorch_lightning.trainer.states import RunningStage
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from lightning_nt.common import map_examples, select_examples, training_loss
from lightning_nt.common.capabilities import reads_training_data_outside_step
from lightning_nt.common.layers import reparametrized_modules

__all__ = [
    "check_accumulation",
    "check_callbacks",
    "check_ledger",
    "check_module",
    "check_optimizer",
    "check_state_unchanged",
    "check_train_loader",
    "check_trainer",
    "planned_steps",
    "state_versions",
]

_ALLOWED_PRECISION = ("32-true", "32", "bf16-mixed")
_TUNERS = (LearningRateFinder, BatchSizeFinder)
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
    tuners = [type(c).__name__ for c in trainer.callbacks if isinstance(c, _TUNERS)]
    if tuners:
        raise RuntimeError(
            f"{', '.join(tuners)} can't run under DP-SGD: it trains through the DP optimizer, chooses from "
            "un-noised training losses, then restores its checkpoint, which drops its noisy steps from the privacy "
            "ledger. Tune on public data (or a non-private run on other data) and pass the values explicitly."
        )
    for callback in trainer.callbacks:
        if isinstance(callback, GradientAccumulationScheduler) and set(callback.scheduling.values()) != {1}:
            raise RuntimeError(
                f"GradientAccumulationScheduler({callback.scheduling}) accumulates gradients under DP-SGD, which "
                "breaks Poisson sampling's accounting: remove it and use a larger batch (sample rate) instead."
            )
        if isinstance(callback, BaseFinetuning):
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


def check_module(module: nn.Module, fix_modules: bool) -> None:
    """Refuse modules whose per-example gradients Opacus can't compute (or repair them with ``fix_modules``)."""
    parametrized = reparametrized_modules(module)
    if parametrized:
        raise RuntimeError(
            f"Modules {parametrized} are parametrized (torch.nn.utils.parametrize, e.g. SubspaceTraining or "
            "weight_norm, or the older torch.nn.utils.weight_norm/spectral_norm hooks): their weight is computed "
            "from other parameters, and DP-SGD with Opacus can't compute per-example gradients through that. "
            "SubspaceTraining is not supported under DP; remove the parametrization (e.g. "
            "torch.nn.utils.remove_weight_norm)."
        )
    renormed = [
        name or "<root>"
        for name, m in module.named_modules()
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.max_norm is not None
    ]
    if renormed:
        raise RuntimeError(
            f"Embeddings {renormed} have max_norm: their forward renormalises, in place, the rows of the tokens in "
            "each batch, outside the noisy update, so the weights would tell which tokens the private batch held. "
            "Remove max_norm (to bound the looked-up vectors, normalise them in forward without changing the "
            "weight, e.g. with F.normalize)."
        )
    errors = ModuleValidator.validate(module, strict=False)
    coupled = [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not errors and not coupled:
        return
    if fix_modules:
        _fix_in_place(module)
        remaining = ModuleValidator.validate(module, strict=False)
        if remaining:
            raise RuntimeError(f"fix_modules=True could not repair: {'; '.join(map(str, remaining))}.")
        return
    problems = "; ".join(
        [str(e) for e in errors] + [f"{n}: BatchNorm couples the examples of a batch" for n in coupled]
    )
    raise RuntimeError(
        f"DP-SGD needs every example's gradient on its own, and this module can't give it: {problems}. "
        "Replace BatchNorm by GroupNorm (or pass fix_modules=True to let Opacus swap the modules before training). "
        "Coupling written by hand (e.g. `x - x.mean(0)` in forward) can't be detected: see DPStrategy's "
        "sensitivity_probe."
    )


def _fix_in_place(module: nn.Module) -> None:
    """Replace every submodule Opacus has a fixer for (BatchNorm -> GroupNorm, ...), affine or not, in place."""
    for name, submodule in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(submodule))
        if fixer is None or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        replacement = fixer(submodule)
        tensor = next(itertools.chain(submodule.parameters(), submodule.buffers()), None)
        if tensor is not None:  # the replacement where the replaced module was (a CUDA module stays on CUDA)
            replacement = replacement.to(tensor.device)
        setattr(module.get_submodule(parent_name), child, replacement)


def state_versions(module: nn.Module, buffer_values: bool = False) -> dict[str, tuple[Any, ...]]:
    """Every parameter and buffer of ``module`` by name: which tensor it is and how often it was modified in place;
    with ``buffer_values``, also a copy of each buffer (an update through ``.data`` leaves the version as it was)."""
    state: dict[str, tuple[Any, ...]] = {name: (id(p), p._version) for name, p in module.named_parameters()}
    for name, buffer in module.named_buffers():
        state[name] = (id(buffer), buffer._version, buffer.detach().clone() if buffer_values else None)
    return state


def check_state_unchanged(module: nn.Module, before: dict[str, tuple[Any, ...]]) -> None:
    """Refuse a training step that changed a parameter or buffer of ``module`` itself (``before``:
    :func:`state_versions` at its start), before the step's noise.

    Buffers travel with the weights (``state_dict``, checkpoints, ``torch.save``) but not through the noisy update:
    one updated from the private batch (running statistics written by hand in ``forward``, an EMA of the inputs, a
    count of the examples seen) would be released without noise; so would a weight changed in place by ``forward``
    (``nn.Embedding(max_norm=...)`` renormalises the rows of the batch's tokens: they told which tokens it held).
    """
    now, buffers = state_versions(module), dict(module.named_buffers())
    changed = sorted(
        name
        for name in before.keys() | now.keys()
        if before.get(name, ())[:2] != now.get(name, ())[:2] or _new_value(before[name], buffers.get(name))
    )
    if changed:
        raise RuntimeError(
            f"training_step changed the module's {changed} itself (e.g. statistics of the batch kept in a buffer in "
            "forward, a weight modified in place): the weights and buffers are saved and released, and only what "
            "goes through the noisy update is covered, so this would release the private data outside the privacy "
            "guarantee (the module in memory now holds it: don't save it). Keep statistics of public data only, "
            "outside training_step, and change the weights only through the optimizer."
        )


def _new_value(before: tuple[Any, ...], buffer: torch.Tensor | None) -> bool:
    """Whether a buffer copied in ``before`` holds another value now (NaN equal to NaN)."""
    saved = before[2] if len(before) > 2 else None
    if saved is None or buffer is None:
        return False
    if saved.is_floating_point():
        return not torch.allclose(saved, buffer, rtol=0.0, atol=0.0, equal_nan=True)
    return not torch.equal(saved, buffer)


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
        with torch.enable_grad():
            training_loss(module, prepare(probe), batch_idx).backward()
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
