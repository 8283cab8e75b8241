"""DP-SGD for any LightningModule, switched on by the Trainer's ``strategy`` flag: the thin Lightning adapter.

:class:`DPStrategy` (one device) and :class:`DPDDPStrategy` (several processes) run the stages of
``lightning_nt.privacy`` (listed in its docstring) from Lightning's hooks: they fail closed before the first step
(``guards``), Poisson-sample the train loader (``sampling``), clip every example's gradient with the engine of
``grad_sample_mode`` inside Opacus's ``DPOptimizer``, which adds the noise (``engines``, per step: ``step``),
calibrate the noise, stop at the budget (``accounting``) and keep the ledger in checkpoints (``ledger``). Nothing
derived from the private batch without noise outlives a step; a ``training_step`` that returns ``None`` (a
data-dependent skip) is refused; an example whose gradient is not finite contributes zero.

What the guarantee covers and what it can't see (hand-written coupling between examples, the user's own logging
in ``training_step``, about which it warns once) is written down in ``docs/privacy-guarantee.md``.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_nt.common.flavours import lightning_classes, lightning_packages
from lightning_nt.common.validation import (
    ArgumentError,
    above,
    at_least,
    between,
    check_argument,
    checked_arguments,
)
from lightning_nt.privacy.accounting import AccountantName, _CalibratedNoise, epsilon_of, make_accountant
from lightning_nt.privacy.agreement import LaterRefusals
from lightning_nt.privacy.engines import ClippingEngine, GradSampleMode, clipping_engine, engine_class, resolved_mode
from lightning_nt.privacy.engines.uses import ParameterUses
from lightning_nt.privacy.guards import check_callbacks, check_optimizer, check_trainer
from lightning_nt.privacy.ledger import _CheckpointedLedger, warn_if_trained_privately_before
from lightning_nt.privacy.module_guards import check_module
from lightning_nt.privacy.reports import _PrivacyReports, warn_about_evaluation_on_training_data, warn_about_options
from lightning_nt.privacy.sampling import (
    private_train_loader,
    shared_seed,
    steps_per_epoch,
    warn_if_autotuning_every_batch_size,
)
from lightning_nt.privacy.step import INDEPENDENCE_TRIES, _PrivateStep

__all__ = ["DPDDPStrategy", "DPStrategy"]


class _DifferentialPrivacy(_CalibratedNoise, _PrivacyReports, _CheckpointedLedger, _PrivateStep):
    """The DP-SGD behaviour shared by the single-device and the DDP strategy: set-up and teardown here; the noise
    calibration in ``accounting.py``, the per-step hooks in ``step.py``, the checkpoint hooks in ``ledger.py``, the
    start- and end-of-training reports in ``reports.py``."""

    @checked_arguments(
        noise_multiplier=at_least(0),
        target_epsilon=above(0),
        delta=between(0, 1, low_open=True, high_open=True),
        max_grad_norm=above(0),
        sample_rate=between(0, 1, low_open=True),
        max_physical_batch_size=at_least(1),
        augmentation_multiplicity=at_least(1),
    )
    def __init__(
        self,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        accountant: AccountantName = "prv",
        grad_sample_mode: GradSampleMode = "hooks",
        sample_rate: float | None = None,
        poisson_sampling: bool = True,
        max_physical_batch_size: int | None = None,
        augmentation_multiplicity: int = 1,
        stop_at_budget: bool = True,
        secure_mode: bool = False,
        fix_modules: bool = False,
        seed: int | None = None,
        allow_nonprivate_callbacks: bool = False,
        log_clip_fraction: bool = False,
        sensitivity_probe: bool = False,
        **strategy_kwargs: Any,
    ) -> None:
        """See :class:`DPStrategy` for the arguments; ``strategy_kwargs`` go to the Lightning strategy."""
        super().__init__(**self._lightning_strategy_arguments(strategy_kwargs))
        engine_class(grad_sample_mode).check_options(
            grad_sample_mode,
            virtual_steps=max_physical_batch_size is not None,
            views=augmentation_multiplicity,
            sensitivity_probe=sensitivity_probe,
        )
        warn_about_options(accountant, log_clip_fraction, seed)
        if noise_multiplier is not None and target_epsilon is not None:
            raise ArgumentError(
                f"`noise_multiplier={noise_multiplier}` and `target_epsilon={target_epsilon}` were both given, but "
                "`target_epsilon` calibrates the noise multiplier itself: pass one of them."
            )
        self.noise_multiplier = 1.0 if noise_multiplier is None else noise_multiplier
        self.target_epsilon, self.delta = target_epsilon, delta
        self.max_grad_norm, self.accountant_name, self.grad_sample_mode = max_grad_norm, accountant, grad_sample_mode
        self.clipping_mode = grad_sample_mode  # the engine in use: "auto" resolved when the module is known
        self.sample_rate, self.poisson_sampling, self.stop_at_budget = sample_rate, poisson_sampling, stop_at_budget
        self.secure_mode, self.fix_modules, self.seed = secure_mode, fix_modules, seed
        self.allow_nonprivate_callbacks, self.log_clip_fraction = allow_nonprivate_callbacks, log_clip_fraction
        self.max_physical_batch_size = max_physical_batch_size
        self.augmentation_multiplicity = augmentation_multiplicity
        self.accountant = make_accountant(accountant)
        self._device_given = "device" in strategy_kwargs
        self._engine: ClippingEngine | None = None  # attached from setup_optimizers to teardown of a fit
        self._rows = 0  # rows of the (flattened) batch the module saw in this step
        self._plan: tuple[Any, ...] | None = None  # what the noise was calibrated for (see accounting.plan_key)
        self.sensitivity_probe = sensitivity_probe
        self._skipped_steps = 0  # steps the budget stop skipped: counted by the loop, not by the ledger
        self._warned_about_logging = False
        self._train_dataset: object | None = None  # the train loader's, to tell when evaluation reads it
        self._warned_about_evaluation = False
        self._probe_pending = False
        self._independence_tries = 0  # see independence.py: on a fit's first usable batch
        self._first_step = False
        self._uses: ParameterUses | None = None  # made on the first step that watches
        self._uses_checked = False
        self._agreeing = False  # see step.py: under DDP, while some rank has first-step checks to run
        self._later: LaterRefusals | None = None  # see step.py: under DDP, a refusal met after the first steps

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (an upper bound with the 'prv' and 'rdp' accountants)."""
        return epsilon_of(self.accountant, self.delta)

    # -- set-up: guards, the clipping engine, the sampled loader and the noise -------------------------------

    def _lightning_strategy_arguments(self, strategy_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments of the Lightning strategy underneath, from those the user passed on."""
        return strategy_kwargs

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            check_trainer(trainer)
            check_callbacks(trainer, self.allow_nonprivate_callbacks)
            check_module(self.lightning_module, self.fix_modules)
            self.clipping_mode = resolved_mode(
                self.grad_sample_mode, self.lightning_module, sensitivity_probe=self.sensitivity_probe
            )
            engine_class(self.clipping_mode).check_precision(trainer.precision)
            warn_if_trained_privately_before(self.lightning_module, self.accountant)
            self._probe_pending = self.sensitivity_probe  # on the first batch of at least 2 examples of this fit
            self._first_step = True  # buffers are compared by value on the first step of a fit
            # layers that mix the examples: on the first usable batch; nothing to mix with one example per forward pass
            self._independence_tries = INDEPENDENCE_TRIES if self.max_physical_batch_size != 1 else 0
            self._uses_checked = False  # parameters used outside their layers: looked for on the first step
            self._agreeing = trainer.world_size > 1  # every rank raises a refusal found on one (agreement.py)
            self._later = LaterRefusals() if trainer.world_size > 1 else None  # so do the later steps
        super().setup(trainer)  # type: ignore[misc]

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]  # Lightning refuses several optimizers here
        check_optimizer(self.optimizers[0])
        self._engine = clipping_engine(
            self.clipping_mode,
            self.lightning_module,
            self.optimizers[0],
            max_grad_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier,
            secure_mode=self.secure_mode,
            views=self.augmentation_multiplicity,
            distributed=trainer.world_size > 1,
        )
        self.optimizers = [self._engine.optimizer]
        self._engine.optimizer.attach_step_hook(self._after_noise)
        if self._later is not None:  # the distributed DP optimizer's all-reduce carries the ranks' refusals
            self._engine.optimizer.agree_on_refusals(self._later)
            self._engine.holds = self._holds

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING or not isinstance(dataloader, DataLoader):
            self._warn_about_evaluation_on_training_data(dataloader)
            return super().process_dataloader(dataloader)  # type: ignore[misc]
        self._train_dataset = dataloader.dataset
        self._warn_about_evaluation_on_training_data(trainer.val_dataloaders)
        sampled, self.sample_rate, expected = private_train_loader(
            dataloader,
            self.sample_rate,
            self.poisson_sampling,
            trainer.global_rank,
            trainer.world_size,
            lambda: shared_seed(self, None if self.secure_mode else self.seed),
        )
        self.optimizers[0].expected_batch_size = expected
        warn_if_autotuning_every_batch_size(sampled, self.root_device)
        self._calibrate(trainer, steps_per_epoch(sampled))
        return super().process_dataloader(sampled)  # type: ignore[misc]

    def _warn_about_evaluation_on_training_data(self, loaders: object) -> None:
        """Once: an evaluation loader that reads the train dataset releases figures of the private data."""
        if self._train_dataset is not None and not self._warned_about_evaluation:
            self._warned_about_evaluation = warn_about_evaluation_on_training_data(self._train_dataset, loaders)

    # -- teardown ------------------------------------------------------------------------

    @override
    def teardown(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine.forget()
            self._engine = None
        if self._uses is not None:
            self._uses.end()
            self._uses = None
        super().teardown()  # type: ignore[misc]


class _PrivateOnManyDevices(_DifferentialPrivacy):
    """Over several processes. DDP's buffer broadcast at every forward pass is off: a process whose Poisson batch is
    empty runs no forward pass, so the others would wait for it there until the process group times out. A private
    step can't change a buffer (refused), so the buffers are broadcast from rank 0 once, when DDP has wrapped the
    module, and stay equal on every rank. A refusal one rank held through the last step (see ``step.py``) is raised
    on every rank before a checkpoint is written and at the end of training, as at the next step's start."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        self._check_later_refusals()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def on_train_end(self) -> None:
        self._check_later_refusals()
        super().on_train_end()

    def _lightning_strategy_arguments(self, strategy_kwargs: dict[str, Any]) -> dict[str, Any]:
        for name in _BUFFER_SYNC_ARGUMENTS:
            value = strategy_kwargs.pop(name, False)
            check_argument(name, value, bool)
            if value:
                raise ValueError(
                    f"{type(self).__name__}({name}=True): DDP would broadcast the buffers in every forward pass, and "
                    "a process whose Poisson batch is empty runs none, so the others would wait for it until the "
                    "process group times out. A private step can't change a buffer (refused), and the strategy "
                    f"broadcasts them from rank 0 once at set-up: leave {name} unset."
                )
        return {**strategy_kwargs, _BUFFER_SYNC_ARGUMENTS[0]: False}

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            with torch.no_grad():
                for buffer in self.lightning_module.buffers():  # once: DDP won't in each forward pass
                    synced = buffer.contiguous()  # the collective needs contiguous memory
                    torch.distributed.broadcast(synced, src=0)
                    if synced is not buffer:
                        buffer.copy_(synced)


_BUFFER_SYNC_ARGUMENTS = (
    ("forward_sync_buffers", "broadcast_buffers")  # torch >= 2.12 deprecates broadcast_buffers
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else ("broadcast_buffers",)
)


class _PrivateOnOneDevice(_DifferentialPrivacy):
    """On one device: by default the Trainer accelerator's current CUDA device, as Lightning's own strategies."""

    @override
    def setup_environment(self) -> None:
        if not self._device_given and isinstance(self.accelerator, lightning_classes("accelerators.CUDAAccelerator")):
            self._root_device = torch.device("cuda", torch.cuda.current_device())
        super().setup_environment()  # type: ignore[misc]


class DPStrategy(_PrivateOnOneDevice, SingleDeviceStrategy):
    """DP-SGD on one device. ``Trainer(strategy="dp_sgd")`` gives the defaults.

    Args:
        noise_multiplier: noise std over ``max_grad_norm`` (1.0 when neither it nor ``target_epsilon`` is given; not
            with ``target_epsilon``, which calibrates it).
        target_epsilon: calibrate the noise so that the planned steps (``max_steps`` or ``max_epochs``) spend at
            most this epsilon, and stop before it would be exceeded (``stop_at_budget``).
        delta: the delta of the guarantee.
        max_grad_norm: per-example gradient clipping norm ``C``.
        accountant: ``"prv"`` (default, tight upper bound), ``"rdp"`` or ``"gdp"`` (approximate).
        grad_sample_mode: the per-example clipping engine: Opacus's ``"hooks"``, ``"functorch"``, or
            ``"ghost"`` (ghost clipping: ``training_step`` returns the ``[B]`` per-example losses, the strategy runs
            the two backward passes), or ``"bk"``: the single-backward book-keeping engine
            (:class:`~lightning_nt.privacy.book_keeping.BookKeepingClipper`; ``training_step`` unchanged, one ordinary
            backward, per-layer ghost or instantiated norms, no weight gradient formed twice), or ``"auto"``: ``"bk"``
            where it can clip every trainable layer (``clipping_mode`` says which was chosen), else ``"hooks"``.
        sample_rate: Poisson rate ``q``; default: logical batch (loader batch size x processes) / dataset size.
        poisson_sampling: ``False`` keeps the loader's own batches (accounting then approximate; warned).
        max_physical_batch_size: split each Poisson batch into physical batches of at most this many examples
            (virtual steps): every part's per-example gradients are clipped and summed before the next part runs,
            and the one noisy update follows the last part, inside one Lightning step.
        augmentation_multiplicity: ``K`` augmented views per example (De et al.): wrap the train dataset in
            :class:`~lightning_nt.privacy.AugmentedViews`, whose items carry the ``K`` views along dimension 1;
            ``training_step`` sees the ``B x K`` views as one flat batch, and each example's gradient is the mean
            of its views' gradients before clipping, so the privacy unit stays the example.
        stop_at_budget: with ``target_epsilon``, skip the step that would exceed it and stop training.
        secure_mode: Opacus's secure noise (robust to floating-point attacks) and OS-drawn seeds even with ``seed``.
        fix_modules: let Opacus replace incompatible modules (BatchNorm -> GroupNorm) before training.
        seed: seed of the Poisson sampler and of the noise, for reproducible experiments only (warned: the accounting
            assumes both are secret); ``None`` (default) draws a fresh seed from the OS for every loader and every
            step's noise (never torch's global RNG, which ``pl.seed_everything`` seeds with a public number).
        allow_nonprivate_callbacks: let callbacks that read the training data outside DP-SGD (those that declare
            ``reads_training_data_outside_step``: GradInit, SharpnessMonitor, CompressionBoundReporter,
            RepresentationSimilarity, LazinessMonitor, GradientSignalTest(data="train")) run; their
            logs are then not covered by the guarantee (warned). Lightning's tuners are refused regardless.
        log_clip_fraction: log ``dp/clip_fraction``, the fraction of each batch's examples that were clipped. It is
            a noiseless statistic of the private batch (its size and which examples were clipped), so it is off by
            default and, when on, NOT covered by the guarantee (warned): for debugging runs whose logs stay private.
        sensitivity_probe: before the first step, check on the first batch that one example (made a canary by
            scaling its inputs) moves the clipped gradient sum by at most ``max_grad_norm``, and refuse the run if
            not. This finds coupling between examples written by hand, which no module check can see. Costs two
            extra forward/backward passes once; releases nothing.
        strategy_kwargs: passed on to Lightning's ``SingleDeviceStrategy`` (``DDPStrategy`` for ``DPDDPStrategy``),
            e.g. ``device``, the device to train on (default: the Trainer accelerator's first device).

    Design limits (see ``docs/privacy-guarantee.md``): the privacy unit is one example of the train dataset. The
    guarantee covers what goes through the noisy update (weights, optimizer state, checkpoints) and the ``dp/*``
    figures; not what ``training_step`` itself logs from the private batch, nor callbacks allowed with
    ``allow_nonprivate_callbacks``, nor the choice of hyper-parameters by repeated runs. A layer that mixes the
    examples of a batch (a sequence-first ``[T, B, d]`` input, ``x - x.mean(0)`` in ``forward``) breaks the
    per-example sensitivity bound: it is refused on a fit's first batch of two distinct examples (the
    example-independence check, three more forward and backward passes), but coupling that spares that batch's
    first and last examples, or that appears on later batches only, is not seen (``sensitivity_probe`` adds a
    canary test of the first batch). A new Trainer
    starts a fresh ledger: resume with ``fit(ckpt_path=...)`` to continue one (a warning says when a module that
    was already trained privately is trained again without it).

    Example::

        trainer = pl.Trainer(max_epochs=10, strategy=DPStrategy(target_epsilon=8.0, delta=1e-5))
        trainer.fit(model)
        trainer.strategy.epsilon   # <= 8.0, also logged as dp/epsilon
    """

    strategy_name = "dp_sgd"


class DPDDPStrategy(_PrivateOnManyDevices, DDPStrategy):
    """DP-SGD over several processes (DDP); same arguments as :class:`DPStrategy`. ``strategy="dp_sgd_ddp"``.

    Every process Poisson-samples its shard of one global batch (all stay in lockstep, empty batches included);
    each clips its examples' gradients, process 0 adds the one noise draw, and the sum is all-reduced.
    Every process keeps an identical accountant. The checks of a fit's first steps run on every process's own
    examples; a refusal found on one process is raised on every process (naming the rank that found it) before any
    update, so rank 0's log says why the run stopped. A refusal that one process meets on a later step (a weighted
    ``EmbeddingBag`` call, a dropout switched on, an input or a random draw first met on some batch) is raised on
    every process at the start of the next step, before a checkpoint is written, or at the end of training: without
    an extra collective or sync per step, the refused step's all-reduce carries it, and that step's update is all-NaN
    on every process (nothing of it is released; the weights and the optimizer's state are NaN after the error, and
    the ledger of every process but the refusing one counts the step: an overcount).
    """

    strategy_name = "dp_sgd_ddp"


def register_strategies() -> None:
    """Register ``"dp_sgd"`` and ``"dp_sgd_ddp"`` with the strategy registry of every installed Lightning package
    (``pytorch_lightning``; ``lightning.pytorch`` with the classes of :mod:`lightning_nt.privacy.unified`); idempotent.
    """
    classes = [(DPStrategy, DPDDPStrategy)]
    if len(lightning_packages()) > 1:
        from lightning_nt.privacy import unified

        classes.append((unified.DPStrategy, unified.DPDDPStrategy))
    for package, (single, distributed) in zip(lightning_packages(), classes, strict=True):
        registry = package.strategies.StrategyRegistry
        for strategy, description in (
            (single, "DP-SGD (Opacus) on one device"),
            (distributed, "DP-SGD (Opacus) with DDP"),
        ):
            if strategy.strategy_name not in registry:
                registry.register(strategy.strategy_name, strategy, description=description)
