"""Lightning adapter for :class:`~lightning_nt.averaging.core.IterateAverage`."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_nt.averaging.core import (
    AveragingMode,
    IterateAverage,
    decay_per_update,
    recompute_batchnorm,
    save_averaged_weights,
)
from lightning_nt.common import LossFn, check_choice, log_scalars, prepare_batch, preserved_loader_rng, training_loss
from lightning_nt.common.evaluation import validation_metrics

__all__ = ["IterateAveraging"]

BatchNormPolicy = Literal["recompute", "average", "copy"]


class IterateAveraging(pl.Callback):
    """Keep a uniform tail average (Gadam/SWA) or an EMA of the weights and validate/test with it.

    Updates happen after optimizer steps (so gradient accumulation is respected), from ``start_step`` or
    ``start_epoch`` on, every ``every_n_steps`` steps, or once at the end of every ``every_n_epochs``-th epoch
    with ``update_on="epoch"`` (Gadam's default, "less frequent averaging"). Averages are fp32, keyed by
    parameter name, updated by fused multi-tensor kernels without host-device synchronisation. Validation and
    test use the average once there is one (never before the first update); training always continues from
    the raw weights, bitwise unchanged, with the optimizer state untouched.

    Args:
        mode: ``"uniform"`` (plain mean of the iterates from the start on) or ``"ema"``.
        start_step: first optimizer step (``trainer.global_step``) whose weights are averaged.
        start_epoch: first epoch (0-based) whose weights are averaged. At most one of the two starts.
        every_n_steps: average every n-th optimizer step (``update_on="step"``).
        update_on: ``"step"`` or ``"epoch"`` (one snapshot at the end of each epoch).
        every_n_epochs: with ``update_on="epoch"``, snapshot every n-th epoch.
        decay: EMA decay per optimizer step (default 0.999 when neither this nor ``half_life`` is given);
            rescaled to ``decay ** every_n_steps`` per update.
        half_life: EMA half-life in optimizer steps, instead of ``decay``.
        warmup: EMA warm-up power ``p``: update ``t`` uses ``min(decay, 1 - (1 + t) ** -p)`` (timm); ``None``: off.
        bn: BatchNorm statistics for the average: ``"recompute"`` them on training batches before each
            evaluation (default, as Gadam and ``torch.optim.swa_utils.update_bn``), ``"average"`` them like
            weights, or ``"copy"`` the raw model's.
        bn_batches: training batches used to recompute BatchNorm statistics (``None``: the whole loader).
        compare_raw: also run validation with the raw weights and log the same metrics under ``raw/<name>``.
        apply_on_end: copy the average into the module when training ends.
        evaluate: validate and test with the average. Only one instance per Trainer may evaluate and only one
            may apply on end; a second average (e.g. an EMA beside a tail average) keeps ``evaluate=False`` and
            is read with :meth:`averaged_state_dict`.
        device: where to keep the averages (default: beside the parameters; ``"cpu"`` saves accelerator memory
            at the cost of a copy per update).
        loss_fn: forward pass used to recompute BatchNorm statistics (default: ``training_step``, muted).

    Example (Gadam in two lines: AdamW in ``configure_optimizers``, then)::

        trainer = pl.Trainer(max_epochs=300,
                             callbacks=[IterateAveraging(mode="uniform", update_on="epoch", start_epoch=161)])

    Example (an EMA beside a tail average)::

        callbacks = [IterateAveraging(start_epoch=10),
                     IterateAveraging(mode="ema", half_life=1000, evaluate=False, apply_on_end=False)]
    """

    def __init__(
        self,
        mode: AveragingMode = "uniform",
        start_step: int | None = None,
        start_epoch: int | None = None,
        every_n_steps: int = 1,
        update_on: Literal["step", "epoch"] = "step",
        every_n_epochs: int = 1,
        decay: float | None = None,
        half_life: float | None = None,
        warmup: float | None = None,
        bn: BatchNormPolicy = "recompute",
        bn_batches: int | None = None,
        compare_raw: bool = False,
        apply_on_end: bool = True,
        evaluate: bool = True,
        device: str | None = None,
        loss_fn: LossFn | None = None,
    ) -> None:
        check_choice("mode", mode, ("uniform", "ema"))
        check_choice("update_on", update_on, ("step", "epoch"))
        check_choice("bn", bn, ("recompute", "average", "copy"))
        for name, value in (("start_step", start_step), ("start_epoch", start_epoch)):
            if value is not None and value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        if start_step is not None and start_epoch is not None:
            raise ValueError("Give at most one of `start_step` and `start_epoch`.")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if bn_batches is not None and bn_batches < 1:
            raise ValueError(f"`bn_batches` must be >= 1 or None, got {bn_batches}.")
        if decay is not None and half_life is not None:
            raise ValueError("Give at most one of `decay` and `half_life`.")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"`decay` must be in (0, 1), got {decay}.")
        if half_life is not None and half_life <= 0:
            raise ValueError(f"`half_life` must be > 0, got {half_life}.")
        if mode == "uniform" and (decay is not None or half_life is not None or warmup is not None):
            raise ValueError("`decay`, `half_life` and `warmup` apply to mode='ema' only.")
        if warmup is not None and warmup <= 0:
            raise ValueError(f"`warmup` must be > 0, got {warmup}.")
        if compare_raw and not evaluate:
            raise ValueError("`compare_raw=True` needs `evaluate=True`.")
        self.mode, self.update_on, self.bn, self.bn_batches = mode, update_on, bn, bn_batches
        self.start_step, self.start_epoch = start_step, start_epoch
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.decay, self.half_life, self.warmup = decay, half_life, warmup
        self.compare_raw, self.apply_on_end, self.device, self.loss_fn = compare_raw, apply_on_end, device, loss_fn
        self.evaluate = evaluate
        self._average: IterateAverage | None = None
        self._pending_state: dict[str, Any] | None = None
        self._device = torch.device("cpu")
        self._last_step = 0
        self._applied = False
        self._swap = ExitStack()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            mode=self.mode,
            evaluate=self.evaluate,
            start_step=self.start_step,
            start_epoch=self.start_epoch,
            every_n_steps=self.every_n_steps,
            update_on=self.update_on,
            every_n_epochs=self.every_n_epochs,
            decay=self.decay,
            half_life=self.half_life,
        )

    @property
    def n_averaged(self) -> int:
        """Number of iterates folded into the average so far."""
        return 0 if self._average is None else self._average.n_averaged

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The averages by parameter (and, with ``bn="average"``, buffer) name, fp32 for floating tensors."""
        return {} if self._average is None else dict(self._average.state)

    def save_averaged_weights(self, path: str | Path) -> None:
        """Save :meth:`averaged_state_dict` for :func:`lightning_nt.averaging.load_averaged_weights`."""
        save_averaged_weights(self.averaged_state_dict(), path)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        averagings = [c for c in trainer.callbacks if isinstance(c, IterateAveraging)]
        for flag in ("evaluate", "apply_on_end"):
            count = sum(getattr(c, flag) for c in averagings)
            if count > 1:
                raise RuntimeError(
                    f"{count} IterateAveraging callbacks have {flag}=True, but the module can hold only one "
                    f"average at a time: pass {flag}=False to all but one."
                )
        self._average = IterateAverage(
            pl_module,
            mode=self.mode,
            decay=self._decay_per_update() if self.mode == "ema" else None,
            warmup=self.warmup,
            buffers=self.bn == "average",
            device=self.device,
        )
        self._device = torch.device(self.device) if self.device else pl_module.device
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
        self._applied = False
        for optimizer in trainer.optimizers:
            if "schedulefree" in type(optimizer).__name__.lower():
                rank_zero_warn(
                    f"{type(optimizer).__name__} already evaluates at an average of its iterates; averaging its "
                    "weights again with IterateAveraging averages twice."
                )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if self._should_update(trainer, batch_idx):
            assert self._average is not None
            self._average.update(pl_module)

    def _should_update(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        if self.start_step is not None and trainer.global_step < self.start_step:
            return False
        if self.start_epoch is not None and trainer.current_epoch < self.start_epoch:
            return False
        if self.update_on == "step":
            return trainer.global_step % self.every_n_steps == 0
        epoch_ends = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or (
            batch_idx + 1 >= trainer.num_training_batches
        )
        return epoch_ends and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_use():
            if self.compare_raw and not trainer.sanity_checking:
                raw = validation_metrics(trainer, pl_module)
                log_scalars(trainer, {f"raw/{name}": value for name, value in raw.items()})
            self._swap_in(trainer, pl_module)
        log_scalars(trainer, {"averaging/n_averaged": self.n_averaged})

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_use():
            self._swap_in(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_scalars(trainer, {"averaging/n_averaged": self.n_averaged})
        if not self.apply_on_end:
            return
        if self.n_averaged == 0:
            rank_zero_warn("IterateAveraging: training ended before the first update; the weights are left raw.")
            return
        assert self._average is not None
        self._average.copy_to(pl_module)
        self._recompute_batchnorm(trainer, pl_module)
        self._applied = True

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self._average is None else self._average.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "average" not in state_dict:
            return
        if self._average is None:  # checkpoints are restored before on_fit_start: finish there
            self._pending_state = state_dict
        else:
            self._average.load_state_dict(state_dict)
            self._average.to(self._device)
            self._pending_state = None

    def _in_use(self) -> bool:
        return self.evaluate and self.n_averaged > 0 and not self._applied

    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._average is not None
        self._swap.enter_context(self._average.swapped_in(pl_module))
        self._recompute_batchnorm(trainer, pl_module)

    def _swap_out(self) -> None:
        self._swap.close()

    def _recompute_batchnorm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bn != "recompute" or trainer.train_dataloader is None:
            return
        dataloader = trainer.train_dataloader

        def forward_passes() -> Any:
            for batch_idx, batch in enumerate(dataloader):
                if self.bn_batches is not None and batch_idx >= self.bn_batches:
                    return
                with trainer.precision_plugin.train_step_context():
                    yield training_loss(pl_module, prepare_batch(trainer, batch), batch_idx, self.loss_fn)

        with torch.no_grad(), preserved_loader_rng(dataloader):
            recompute_batchnorm(pl_module, forward_passes())

    def _decay_per_update(self) -> float:
        decay = 0.999 if self.decay is None and self.half_life is None else self.decay
        return decay_per_update(decay, self.half_life, self.every_n_steps if self.update_on == "step" else 1)
