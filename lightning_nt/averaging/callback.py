"""Lightning adapter for :class:`~lightning_nt.averaging.core.RunningWeightAverage`."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_nt.averaging.core import (
    AveragingMode,
    RunningWeightAverage,
    decay_per_update,
    recompute_batchnorm,
    save_averaged_weights,
    torch_device,
)
from lightning_nt.common import LossFn, log_scalars, prepare_batch, preserved_loader_rng, training_loss
from lightning_nt.common.callback import Callback
from lightning_nt.common.capabilities import run_before_other_callbacks
from lightning_nt.common.evaluation import validation_metrics
from lightning_nt.common.flavours import lightning_classes
from lightning_nt.common.state import continues_earlier_fit, stable_name
from lightning_nt.common.validation import above, at_least, between, checked_arguments, non_empty

__all__ = ["IterateAveraging"]

BatchNormPolicy = Literal["recompute", "average", "copy"]


class IterateAveraging(Callback):
    """Keep a uniform tail average (Gadam/SWA) or an EMA of the weights and validate/test with it.

    Updates happen after optimizer steps (so gradient accumulation is respected), from ``start_step`` or
    ``start_epoch`` on, every ``every_n_steps`` steps, or once at the end of every ``every_n_epochs``-th epoch
    with ``update_on="epoch"`` (Gadam's default, "less frequent averaging"). Averages are fp32, keyed by parameter
    name, updated by fused multi-tensor kernels. An iterate with a NaN or infinite weight is left out (one warning,
    counted in ``<name>/skipped``); on CUDA the update never waits for the GPU (the finiteness flag and the counts
    stay on the device), so that warning comes when the count is read: at the end of the epoch, at validation or
    when training ends. Validation and test use the average once there is one (never before the first update);
    training always continues from the raw weights, bitwise unchanged, with the optimizer state untouched. The raw
    weights come back also when validation raises or is interrupted.

    Checkpoints follow Lightning's ``WeightAveraging`` convention: while validation uses the average (and after
    ``apply_on_end``), a checkpoint's ``state_dict`` holds the evaluated weights, i.e. the average with the
    BatchNorm statistics it was validated with, so ``ModelCheckpoint(monitor=...)`` saves what it ranked and
    ``trainer.test(ckpt_path="best")`` tests it; the raw weights travel in this callback's state and come back
    when ``fit`` resumes from the checkpoint. ``validate``/``test`` with a ``ckpt_path`` evaluate the checkpoint's
    weights as they are. Lightning calls no callback for weights-only checkpoints: those hold the raw weights.

    Memory: one fp32 copy of the weights, one scratch copy while an evaluation runs, and after ``apply_on_end``
    a CPU copy of the raw weights (for a checkpoint saved after fit). After fit the callback holds no reference
    to the module's tensors.

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
            evaluation (default, as Gadam and ``torch.optim.swa_utils.update_bn``; with every submodule in the
            mode it trained in, so a BatchNorm kept in eval mode during training, e.g. in a frozen backbone, keeps
            its running statistics), ``"average"`` them like weights, or ``"copy"`` the raw model's.
        bn_batches: training batches used to recompute BatchNorm statistics (``None``: the whole loader).
        compare_raw: also run validation with the raw weights and log the same metrics under ``raw/<name>``.
        apply_on_end: copy the average into the module when training ends.
        evaluate: validate and test with the average. Only one instance per Trainer may evaluate and only one
            may apply on end; a second average (e.g. an EMA beside a tail average) keeps ``evaluate=False`` and
            is read with :meth:`averaged_state_dict`.
        device: where to keep the averages (default: beside the parameters; ``"cpu"`` saves accelerator memory
            at the cost of a copy per update).
        loss_fn: forward pass used to recompute BatchNorm statistics (default: ``training_step``, muted).
        name: prefix of this instance's tags (``<name>/n_averaged``, ``<name>/skipped``). By default the first
            instance logs under ``averaging/``, further unnamed ones under ``averaging_1/``, ``averaging_2/``...

    Example (Gadam in two lines: AdamW in ``configure_optimizers``, then)::

        trainer = pl.Trainer(max_epochs=300,
                             callbacks=[IterateAveraging(mode="uniform", update_on="epoch", start_epoch=161)])

    Example (an EMA beside a tail average, logged as ``ema/n_averaged``)::

        callbacks = [IterateAveraging(start_epoch=10),
                     IterateAveraging(mode="ema", half_life=1000, evaluate=False, apply_on_end=False, name="ema")]
    """

    @checked_arguments(
        start_step=at_least(0),
        start_epoch=at_least(0),
        every_n_steps=at_least(1),
        every_n_epochs=at_least(1),
        decay=between(0.0, 1.0, low_open=True, high_open=True),
        half_life=above(0.0),
        warmup=above(0.0),
        bn_batches=at_least(1),
        device=torch_device(),
        name=non_empty(),
    )
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
        device: torch.device | str | None = None,
        loss_fn: LossFn | None = None,
        name: str | None = None,
    ) -> None:
        if start_step is not None and start_epoch is not None:
            raise ValueError("Give at most one of `start_step` and `start_epoch`.")
        if decay is not None and half_life is not None:
            raise ValueError("Give at most one of `decay` and `half_life`.")
        if mode == "uniform" and (decay is not None or half_life is not None or warmup is not None):
            raise ValueError("`decay`, `half_life` and `warmup` apply to mode='ema' only.")
        if compare_raw and not evaluate:
            raise ValueError("`compare_raw=True` needs `evaluate=True`.")
        self.mode, self.update_on, self.bn, self.bn_batches = mode, update_on, bn, bn_batches
        self.start_step, self.start_epoch = start_step, start_epoch
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.decay, self.half_life, self.warmup = decay, half_life, warmup
        self.compare_raw, self.apply_on_end, self.device, self.loss_fn = compare_raw, apply_on_end, device, loss_fn
        self.evaluate, self.name = evaluate, name
        self._tag = name or "averaging"
        self._average: RunningWeightAverage | None = None
        self._pending_state: dict[str, Any] | None = None
        self._device = torch.device("cpu")
        self._last_step = 0
        self._raw_state: dict[str, Tensor] | None = None  # the raw weights, once the average was applied on end
        self._evaluated_buffers: tuple[int, dict[str, Tensor]] | None = None
        self._holds_checkpoint = False  # validate/test with a checkpoint: the module holds its evaluated weights
        self._warned_skip = False
        self._skips_seen = (0, 0)  # (n_skipped, global step) when the skip count was last read
        self._training_modes: dict[str, bool] | None = None  # each submodule's `training` flag at the last update
        self._swap = ExitStack()
        self._swapped: dict[str, Tensor] | None = None  # while the average is swapped in: the raw tensors by name

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
            warmup=self.warmup,
            bn=self.bn,
            bn_batches=self.bn_batches,
            compare_raw=self.compare_raw,
            apply_on_end=self.apply_on_end,
            device=None if self.device is None else str(torch.device(self.device)),
            loss_fn=stable_name(self.loss_fn),
            name=self.name,
        )

    @property
    def n_averaged(self) -> int:
        """Number of iterates folded into the average so far."""
        return 0 if self._average is None else self._average.n_averaged

    @property
    def n_skipped(self) -> int:
        """Number of iterates left out because a weight was NaN or infinite."""
        return 0 if self._average is None else self._average.n_skipped

    def averaged_state_dict(self) -> dict[str, Tensor]:
        """The averages by parameter (and, with ``bn="average"``, buffer) name, fp32 for floating tensors."""
        return {} if self._average is None else dict(self._average.state)

    def save_averaged_weights(self, path: str | Path) -> None:
        """Save :meth:`averaged_state_dict` for :func:`lightning_nt.averaging.load_averaged_weights`."""
        save_averaged_weights(self.averaged_state_dict(), path)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Run first (when this instance's average is what the module ends with): every other callback's
        ``on_train_end`` (CompressionBoundReporter's certificate, a monitor's last measurement) then describes the
        model ``fit`` returns, whatever the order of ``callbacks=``."""
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.apply_on_end:
            run_before_other_callbacks(trainer, self)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        averagings = [c for c in trainer.callbacks if isinstance(c, IterateAveraging)]
        _check_instances(averagings)
        self._check_lightning_averaging(trainer)
        self._continue_earlier_fit(trainer, pl_module)
        self._average = RunningWeightAverage(
            pl_module,
            mode=self.mode,
            decay=self._decay_per_update() if self.mode == "ema" else None,
            warmup=self.warmup,
            buffers=self.bn == "average",
            device=self.device,
        )
        self._device = torch.device(self.device) if self.device else pl_module.device
        self._raw_state = self._evaluated_buffers = None
        self._holds_checkpoint = False
        self._load_pending_state()
        for optimizer in trainer.optimizers:
            if "schedulefree" in type(optimizer).__name__.lower():
                rank_zero_warn(
                    f"{type(optimizer).__name__} already evaluates at an average of its iterates; averaging its "
                    "weights again with IterateAveraging averages twice."
                )
        if self.evaluate and any(getattr(c, "save_weights_only", False) for c in trainer.checkpoint_callbacks):
            rank_zero_warn(
                "IterateAveraging: Lightning does not call callbacks when it saves a weights-only checkpoint, so "
                "those checkpoints hold the raw weights, not the average that validation used. Use full "
                "checkpoints (save_weights_only=False) or `save_averaged_weights`."
            )

    def _check_lightning_averaging(self, trainer: pl.Trainer) -> None:
        """Lightning's own averaging callbacks also swap their average in for validation and copy it into the module
        when training ends: with this one doing the same, which average was validated and which one ``fit`` returns
        would depend on the order of the callbacks."""
        lightning = [
            type(c).__name__ for c in trainer.callbacks if isinstance(c, lightning_classes(*_LIGHTNING_AVERAGING))
        ]
        if lightning and (self.evaluate or self.apply_on_end):
            raise RuntimeError(
                f"IterateAveraging and {', '.join(lightning)} would both put their average into the module (for "
                "validation and at the end of training), but it can hold only one: remove one of them, or keep "
                "IterateAveraging as an observer with evaluate=False and apply_on_end=False (read its average with "
                "`averaged_state_dict`)."
            )

    def _continue_earlier_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A further ``fit`` on the same Trainer (``global_step > 0``, no checkpoint) continues the run as a resume
        from a checkpoint would: the raw weights come back (the module ends the earlier fit holding the average) and
        the average goes on from its iterates instead of starting again."""
        if self._average is None or not continues_earlier_fit(trainer):
            return
        if self._raw_state is not None:
            pl_module.load_state_dict(self._raw_state, strict=pl_module.strict_loading)
        self._pending_state = self._average.state_dict()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._load_pending_state()  # strategies that restore checkpoints after setup restore after on_fit_start
        self._last_step = trainer.global_step
        self._skips_seen = (self.n_skipped, trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step in this batch (gradient accumulation)
            return
        self._last_step = step
        if not self._should_update(trainer, batch_idx):
            return
        assert self._average is not None
        self._training_modes = {name: module.training for name, module in pl_module.named_modules()}
        if self._average.update(pl_module) is False:  # on CUDA a flag on the device: read later, see `_check_skips`
            self._report_skips(trainer, f"the weights at step {trainer.global_step} are")

    def _check_skips(self, trainer: pl.Trainer) -> None:
        """Warn about iterates skipped since the count was last read (on CUDA the update leaves the count on the
        device, so it is read here: at epoch end, at validation and when training ends, never at every step)."""
        seen, since = self._skips_seen
        if self.n_skipped > seen:
            self._report_skips(trainer, f"{self.n_skipped - seen} iterate(s) since step {since} were")
        self._skips_seen = (self.n_skipped, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_skips(trainer)

    def _report_skips(self, trainer: pl.Trainer, what: str) -> None:
        if not self._warned_skip:
            rank_zero_warn(
                f"IterateAveraging: {what} not finite (NaN or inf) and left out of the average. Skipped "
                f"iterates are counted in `{self._tag}/skipped`."
            )
            self._warned_skip = True
        log_scalars(trainer, {f"{self._tag}/skipped": self.n_skipped})
        self._skips_seen = (self.n_skipped, trainer.global_step)

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
                log_scalars(trainer, {f"raw/{name}": value for name, value in raw.callback.items()}, to_loggers=False)
                log_scalars(trainer, {f"raw/{name}": value for name, value in raw.logged.items()})
            self._swap_in(trainer, pl_module)
        self._log_counts(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_use():
            self._swap_in(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the raw weights back to the module (a checkpoint saved on exception then holds the run)."""
        self._swap_out(pl_module)
        if self._average is not None:
            self._average.release()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._average is not None
        self._average.release()  # after fit, the callback holds no reference to the module's tensors
        self._log_counts(trainer)
        if not self.apply_on_end:
            return
        if self.n_averaged == 0:
            rank_zero_warn("IterateAveraging: training ended before the first update; the weights are left raw.")
            return
        raw = {name: tensor.detach().to("cpu", copy=True) for name, tensor in pl_module.state_dict().items()}
        try:
            self._average.copy_to(pl_module)
            self._recompute_batchnorm(trainer, pl_module)
        except BaseException:
            pl_module.load_state_dict(raw)
            raise
        self._raw_state = raw

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning binds the module's `log`/`log_dict` to every callback at each run (and binds them again at the
        # next): drop them, so a callback kept for its average does not keep the module and its weights alive
        super().teardown(trainer, pl_module, stage)
        for name in ("log", "log_dict"):
            self.__dict__.pop(name, None)
        if stage != "fit":  # a checkpoint loaded to validate or test does not carry over to the next stage
            self._holds_checkpoint = False
            self._pending_state = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {} if self._average is None else self._average.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "average" in state_dict:  # checkpoints are restored before on_fit_start: finish there
            self._pending_state = state_dict

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Lightning's weight-averaging convention: ``state_dict`` holds the evaluated weights, the raw ones sit beside.

        While the average is what validation uses, and after it was applied on end, the checkpoint's ``state_dict``
        holds the average (so ``test(ckpt_path="best")`` and ``ModelCheckpoint(monitor=...)`` see the weights that
        were validated) and the callback state holds the raw weights, which come back when training resumes.
        """
        if self._raw_state is not None:
            raw, evaluated = self._raw_state, checkpoint["state_dict"]
        elif self._swapped is not None:  # saved from inside an evaluation: the module holds the average now
            raw, evaluated = _by_state_key(pl_module, self._swapped), checkpoint["state_dict"]
        elif self._in_use():
            raw, evaluated = checkpoint["state_dict"], self._evaluated_state(trainer, pl_module)
        else:
            return
        checkpoint["state_dict"] = evaluated
        checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})["raw_state_dict"] = raw

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self._holds_checkpoint = True  # the module holds the checkpoint's weights: evaluate those as they are
            return
        states = checkpoint.get("callbacks", {})
        raw = states.get(self.state_key, {}).get("raw_state_dict")
        if raw is not None:
            pl_module.load_state_dict(raw, strict=pl_module.strict_loading)
        elif any("raw_state_dict" in state for key, state in states.items() if key.startswith("IterateAveraging")):
            rank_zero_warn(
                "IterateAveraging: this checkpoint was saved by an IterateAveraging configured differently (its "
                "state key differs), so its average and raw weights are not restored and training resumes from the "
                "weights in its `state_dict`, which are the average. Resume with the same IterateAveraging arguments."
            )

    def _load_pending_state(self) -> None:
        if self._pending_state is not None and self._average is not None:
            self._average.load_state_dict(self._pending_state)
            self._average.to(self._device)
            self._pending_state = None

    def _log_counts(self, trainer: pl.Trainer) -> None:
        self._check_skips(trainer)
        log_scalars(trainer, {f"{self._tag}/n_averaged": self.n_averaged, f"{self._tag}/skipped": self.n_skipped})

    def _in_use(self) -> bool:
        return self.evaluate and self.n_averaged > 0 and self._raw_state is None and not self._holds_checkpoint

    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._average is not None
        self._swapped = self._swap.enter_context(self._average.swapped_in(pl_module))
        self._recompute_batchnorm(trainer, pl_module)

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        """Give the raw weights back, keeping the evaluated BatchNorm statistics for a checkpoint saved next."""
        if self._swapped is None:
            return
        if self.bn == "recompute":
            self._evaluated_buffers = (self.n_averaged, _batchnorm_buffers(pl_module))
        self._swapped = None
        self._swap.close()

    def _evaluated_state(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The module's ``state_dict`` as validation evaluates it now: the average, with its BatchNorm statistics."""
        assert self._average is not None
        if self.bn == "recompute" and (
            self._evaluated_buffers is None or self._evaluated_buffers[0] != self.n_averaged
        ):
            self._swap_in(trainer, pl_module)
            self._swap_out(pl_module)
        buffers = self._evaluated_buffers[1] if self.bn == "recompute" and self._evaluated_buffers else {}
        evaluated = _by_state_key(pl_module, self._average.state | buffers)
        return {key: evaluated[key].to(tensor.dtype) for key, tensor in pl_module.state_dict().items()}

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
            recompute_batchnorm(pl_module, forward_passes(), self._training_modes)

    def _decay_per_update(self) -> float:
        decay = 0.999 if self.decay is None and self.half_life is None else self.decay
        return decay_per_update(decay, self.half_life, self.every_n_steps if self.update_on == "step" else 1)


# Lightning's WeightAveraging (EMAWeightAveraging, ...) exists from pytorch-lightning 2.6 on
_LIGHTNING_AVERAGING = ("callbacks.StochasticWeightAveraging", "callbacks.WeightAveraging")


def _check_instances(averagings: list[IterateAveraging]) -> None:
    """Refuse instances that would fight over the module, and give each unnamed one its own tag prefix."""
    for flag in ("evaluate", "apply_on_end"):
        count = sum(getattr(c, flag) for c in averagings)
        if count > 1:
            raise RuntimeError(
                f"{count} IterateAveraging callbacks have {flag}=True, but the module can hold only one "
                f"average at a time: pass {flag}=False to all but one."
            )
    evaluating = [c for c in averagings if c.evaluate]
    applying = [c for c in averagings if c.apply_on_end]
    if evaluating and applying and evaluating[0] is not applying[0]:
        raise RuntimeError(
            "One IterateAveraging callback evaluates and another applies its average on end, so validation and "
            "the final model would use different averages: give evaluate=True and apply_on_end=True to the same one."
        )
    taken = {c.name for c in averagings if c.name is not None}
    unnamed = 0
    for callback in averagings:
        if callback.name is None:
            while (tag := "averaging" if unnamed == 0 else f"averaging_{unnamed}") in taken:
                unnamed += 1
            callback._tag = tag
            taken.add(tag)
    tags = [c._tag for c in averagings]
    if len(set(tags)) < len(tags):
        raise RuntimeError(
            f"Two IterateAveraging callbacks log under the same name ({tags}): give each its own `name=`."
        )


def _by_state_key(module: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``module.state_dict()`` with ``tensors`` (named as in ``named_parameters``/``named_buffers``) substituted.

    A tied tensor appears in ``state_dict`` under each of its names, and in ``named_parameters`` under the first.
    """
    names = {id(tensor): name for name, tensor in [*module.named_parameters(), *module.named_buffers()]}
    return {
        key: tensors.get(names.get(id(tensor), key), tensor).detach()
        for key, tensor in module.state_dict(keep_vars=True).items()
    }


def _batchnorm_buffers(module: nn.Module) -> dict[str, Tensor]:
    return {
        f"{prefix}.{name}" if prefix else name: buffer.detach().clone()
        for prefix, norm in module.named_modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm)
        for name, buffer in norm.named_buffers(recurse=False)
    }
