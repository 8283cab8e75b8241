"""DP-SGD for any LightningModule, switched on by the Trainer's ``strategy`` flag (Opacus underneath).

What the strategy does, on one device (:class:`DPStrategy`) or many (:class:`DPDDPStrategy`):

* fails closed before the first step on settings that would break the guarantee (BatchNorm and other
  modules Opacus can't handle, parametrized modules, gradient accumulation, Trainer gradient clipping, fp16 with a
  GradScaler, manual optimization, several optimizers, LBFGS, tuners, callbacks that read the training data,
  iterable datasets or batch samplers without a sample rate; see :mod:`lightning_nt.privacy.guards`);
* attaches Opacus's per-sample-gradient hooks to the module itself (no wrapper) and wraps the optimizer in
  Opacus's ``DPOptimizer`` (clip each example's gradient to ``max_grad_norm``, add one Gaussian noise draw of
  std ``noise_multiplier * max_grad_norm``, divide by the expected batch size);
* replaces the train loader's sampler by Poisson sampling at rate ``q`` (same dataset and collate), keeping
  empty batches as steps, sharded so that data-parallel processes stay in lockstep;
* keeps the accountant's ledger, reports ``dp/epsilon`` and friends, stops before ``target_epsilon`` would
  be exceeded, and puts the ledger into checkpoints (a checkpoint without it, or with one that doesn't match its
  step count, refuses to resume; restoring an earlier checkpoint in the middle of a run is refused);
* releases nothing un-noised: the clipped sums, per-example gradients, norms and activations are dropped after
  every step; a ``training_step`` that returns ``None`` (a data-dependent skip) is refused; an example whose
  gradient is not finite contributes zero (the sensitivity stays ``max_grad_norm``).

What the guarantee covers and what it can't see (hand-written coupling between examples, the user's own logging
in ``training_step``, about which it warns once) is written down in ``docs/privacy-guarantee.md``.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lightning_fabric.utilities.types import _PATH
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import (
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
)
from pytorch_lightning.accelerators import CUDAAccelerator
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy, StrategyRegistry
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_nt.common import (
    batch_size,
    captured_logging,
    frozen_metrics,
    log_scalars,
    loss_from_output,
    map_examples,
    select_examples,
)
from lightning_nt.common.validation import above, at_least, between, checked_arguments
from lightning_nt.privacy.accounting import AccountantName, calibrate_noise, epsilon_of, make_accountant
from lightning_nt.privacy.book_keeping import BookKeepingClipper
from lightning_nt.privacy.guards import (
    check_callbacks,
    check_ledger,
    check_module,
    check_optimizer,
    check_sensitivity,
    check_train_loader,
    check_trainer,
    planned_steps,
)
from lightning_nt.privacy.sampling import poisson_dataloader

__all__ = ["DPDDPStrategy", "DPStrategy"]

GradSampleMode = Literal["hooks", "ew", "functorch", "ghost", "bk"]
_CHECKPOINT_KEY = "dp_accountant"
_MODULE_LEDGER = "_lightning_nt_dp_ledger"  # left on a module trained privately, to warn when it is trained again
_PER_EXAMPLE_ATTRIBUTES = ("grad_sample", "summed_grad", "_current_grad_sample", "_norm_sample")


class _DifferentialPrivacy:
    """The DP-SGD behaviour shared by the single-device and the DDP strategy."""

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
        noise_multiplier: float = 1.0,
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
        super().__init__(**strategy_kwargs)
        if grad_sample_mode == "ghost" and (max_physical_batch_size is not None or augmentation_multiplicity != 1):
            raise ValueError(
                "`grad_sample_mode='ghost'` can't be combined with `max_physical_batch_size` or "
                "`augmentation_multiplicity`: use 'hooks' for those."
            )
        if sensitivity_probe and grad_sample_mode in ("ghost", "bk"):
            raise ValueError("`sensitivity_probe=True` needs per-example gradients: use grad_sample_mode='hooks'.")
        if accountant == "gdp":
            rank_zero_warn("accountant='gdp' is a central-limit approximation and can under-report epsilon.")
        self.noise_multiplier, self.target_epsilon, self.delta = noise_multiplier, target_epsilon, delta
        self.max_grad_norm, self.accountant_name, self.grad_sample_mode = max_grad_norm, accountant, grad_sample_mode
        self.sample_rate, self.poisson_sampling, self.stop_at_budget = sample_rate, poisson_sampling, stop_at_budget
        self.secure_mode, self.fix_modules, self.seed = secure_mode, fix_modules, seed
        self.allow_nonprivate_callbacks, self.log_clip_fraction = allow_nonprivate_callbacks, log_clip_fraction
        if log_clip_fraction:
            rank_zero_warn(
                "DPStrategy(log_clip_fraction=True) logs dp/clip_fraction, a noiseless statistic of every private "
                "batch (its size and which examples were clipped): it is NOT covered by the privacy guarantee. "
                "Use it for debugging only, never on a run whose logs are released."
            )
        if seed is not None:
            rank_zero_warn(
                "DPStrategy(seed=...) makes the Poisson batches reproducible by anyone who knows the seed; the privacy "
                "accounting assumes they are secret. Leave seed=None for a real guarantee."
            )
        self.max_physical_batch_size, self.augmentation_multiplicity = (
            max_physical_batch_size,
            augmentation_multiplicity,
        )
        self.accountant = make_accountant(accountant)
        self._device_given = "device" in strategy_kwargs
        self._hooks: Any = None
        self._clipper: BookKeepingClipper | None = None
        self._rows = 0  # rows of the (flattened) batch the module saw in this step
        self._plan: tuple[Any, ...] | None = None
        self._per_example_losses: torch.Tensor | None = None
        self.sensitivity_probe = sensitivity_probe
        self._skipped_steps = 0  # steps the budget stop skipped: counted by the loop, not by the ledger
        self._warned_about_logging = False
        self._probe_pending = False

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (an upper bound with the 'prv' and 'rdp' accountants)."""
        return epsilon_of(self.accountant, self.delta)

    # -- set-up --------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            check_trainer(trainer)
            self._check_precision(trainer)
            check_callbacks(trainer, self.allow_nonprivate_callbacks)
            check_module(self.lightning_module, self.fix_modules)
            self._warn_if_trained_privately_before(self.lightning_module)
            self._probe_pending = self.sensitivity_probe  # on the first batch of at least 2 examples of this fit
        super().setup(trainer)  # type: ignore[misc]
        if trainer.state.fn == TrainerFn.FITTING and self.grad_sample_mode == "bk":
            self._clipper = _book_keeping_clipper(
                self.lightning_module, self.max_grad_norm, self.augmentation_multiplicity
            )
        elif trainer.state.fn == TrainerFn.FITTING:
            ghost = {"max_grad_norm": self.max_grad_norm} if self.grad_sample_mode == "ghost" else {}
            self._hooks = prepare_module(
                self.lightning_module,
                grad_sample_mode=self.grad_sample_mode,
                wrap_model=False,
                loss_reduction="mean",
                **ghost,
            )
            self._hooks.disable_hooks()  # on only from a training step to its optimizer step

    def _check_precision(self, trainer: pl.Trainer) -> None:
        if self.grad_sample_mode == "ghost" and trainer.precision != "32-true":
            raise RuntimeError(
                f"grad_sample_mode='ghost' with precision={trainer.precision!r}: Opacus computes the ghost norms in "
                "low precision, so a clipped gradient could exceed max_grad_norm. Use precision='32-true' or 'hooks'."
            )

    def _warn_if_trained_privately_before(self, module: pl.LightningModule) -> None:
        earlier = getattr(module, _MODULE_LEDGER, None)
        if earlier is None or self.accountant.history:  # a resumed run continues its checkpoint's ledger
            return
        rank_zero_warn(
            f"This module was already trained privately (epsilon {earlier['epsilon']:.4g} at delta "
            f"{earlier['delta']:g}), and this fit starts a fresh privacy ledger: dp/epsilon counts only this fit. "
            "The privacy spent on the data in total is at least the sum of both (compose them), or resume the "
            "earlier run with fit(ckpt_path=...) to continue its ledger."
        )

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]  # Lightning refuses several optimizers here
        check_optimizer(self.optimizers[0])
        distributed = trainer.world_size > 1
        if self.grad_sample_mode in ("ghost", "bk"):  # the engine leaves the clipped sum in .grad
            optimizer_class = _GhostDistributedDPOptimizer if distributed else _GhostDPOptimizer
        else:
            optimizer_class = _CarryingDistributedDPOptimizer if distributed else _CarryingDPOptimizer
        self.optimizers = [
            optimizer_class(
                self.optimizers[0],
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.max_grad_norm,
                expected_batch_size=1,  # set from the sample rate once the train loader is known
                loss_reduction="mean",
                secure_mode=self.secure_mode,
            )
        ]
        self.optimizers[0].views = self.augmentation_multiplicity
        self.optimizers[0].attach_step_hook(self._after_noise)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer
        if trainer.state.stage != RunningStage.TRAINING or not isinstance(dataloader, DataLoader):
            return super().process_dataloader(dataloader)  # type: ignore[misc]
        world_size = trainer.world_size
        if isinstance(dataloader.dataset, IterableDataset):
            sampled, expected = dataloader, self._expected_batch_of_iterable(dataloader)
        else:
            num_examples = len(dataloader.dataset)  # type: ignore[arg-type]
            if self.poisson_sampling:
                check_train_loader(dataloader, self.sample_rate)
            self.sample_rate = min(self.sample_rate or (dataloader.batch_size or 1) * world_size / num_examples, 1.0)
            expected = self.sample_rate * num_examples / world_size
            if self.poisson_sampling:
                seed = self._sampling_seed(trainer)
                sampled = poisson_dataloader(dataloader, self.sample_rate, trainer.global_rank, world_size, seed)
            else:
                rank_zero_warn("poisson_sampling=False: batches are not Poisson-sampled, so epsilon is approximate.")
                sampled = dataloader
        self.optimizers[0].expected_batch_size = expected
        self._calibrate(trainer, _length(sampled))
        return super().process_dataloader(sampled)  # type: ignore[misc]

    def _expected_batch_of_iterable(self, dataloader: DataLoader) -> float:
        if self.sample_rate is None or not dataloader.batch_size:
            raise RuntimeError(
                "DP-SGD can't Poisson-sample an IterableDataset: use a map-style dataset, or sample each example with "
                "rate q yourself, pass `sample_rate=q`, and give the DataLoader `batch_size` = the expected batch q*N."
            )
        return float(dataloader.batch_size)

    def _sampling_seed(self, trainer: pl.Trainer) -> int:
        """The sampler's seed, the same on every process; each epoch draws from ``(seed, epoch)``.

        Without an explicit ``seed`` it comes from the OS for every loader (reloads and resumes never replay
        batches), so that batch membership stays secret, as the privacy amplification by sampling assumes. With
        ``seed=`` (reproducible experiments, warned) a run resumed at an epoch boundary draws the batches the
        uninterrupted run drew.
        """
        if self.seed is None or self.secure_mode:
            value = torch.tensor(secrets.randbits(62), device=trainer.strategy.root_device)
            return int(trainer.strategy.broadcast(value, src=0))
        return self.seed

    def _calibrate(self, trainer: pl.Trainer, steps_per_epoch: int | None) -> None:
        optimizer = self.optimizers[0]
        if self.target_epsilon is None:
            if self.noise_multiplier == 0:
                rank_zero_warn("noise_multiplier=0: no privacy at all, epsilon is reported as inf.")
            return
        planned = planned_steps(trainer, steps_per_epoch)
        if not self.accountant.history:  # a resumed run keeps the noise its ledger was spent with
            assert self.sample_rate is not None
            self.noise_multiplier = calibrate_noise(
                self.target_epsilon, self.delta, self.sample_rate, planned, self.accountant_name
            )
            self._plan = self._plan_key(planned)
        optimizer.noise_multiplier = self.noise_multiplier

    # -- training ------------------------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        self._rows = 0
        if batch is not None and batch_size(batch) == 0:
            return self._empty_step()
        self._engine_on()
        if batch is not None and self._probe_pending and batch_size(batch) >= 2:
            self._probe_sensitivity(batch, args[1] if len(args) > 1 else 0)
            self._probe_pending = False
        if batch is not None and self.max_physical_batch_size is not None:
            batch = self._virtual_steps(batch, args[1] if len(args) > 1 else 0)
        if batch is not None:
            args = (self._flat_views(batch), *args[1:])
            self._rows = batch_size(args[0])
        with self._without_ddp_gradient_sync():  # the DP optimizer reduces the clipped, noised gradients itself
            output = _refuse_skipped_step(super().training_step(*args, **kwargs))  # type: ignore[misc]
        self._warn_about_logging_from_the_batch()
        return self._stash_per_example_losses(output) if self.grad_sample_mode == "ghost" else output

    def _warn_about_logging_from_the_batch(self) -> None:
        """Once: what ``training_step`` logs is computed on the private batch without noise (outside the guarantee)."""
        if self._warned_about_logging:
            return
        results = getattr(self.lightning_module.trainer, "_results", None) or {}
        names = sorted({key.split(".", 1)[1] for key in results if key.startswith("training_step.")})
        if names:
            self._warned_about_logging = True
            rank_zero_warn(
                f"training_step logs {names}, computed on the private batch without noise: these figures are NOT "
                "covered by the privacy guarantee (only the dp/* figures and what goes through the noisy update are). "
                "Keep them private, or log figures computed on public data (e.g. in validation_step)."
            )

    def _probe_sensitivity(self, batch: Any, batch_idx: int) -> None:
        """``sensitivity_probe=True``: one canary check of the per-example bound on a first batch (no release)."""
        if self.max_physical_batch_size is not None:
            batch = select_examples(batch, slice(0, self.max_physical_batch_size))
        optimizer = self.optimizers[0]
        optimizer.clear_per_example_state()
        with self._without_ddp_gradient_sync():
            check_sensitivity(
                self.lightning_module, optimizer, batch, batch_idx, self.max_grad_norm, prepare=self._flat_views
            )

    def _stash_per_example_losses(self, output: Any) -> Any:
        """Ghost clipping: keep the ``[B]`` losses for the two backward passes, hand Lightning their mean."""
        losses = output["loss"] if isinstance(output, dict) else output
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
            raise RuntimeError(
                "grad_sample_mode='ghost' needs training_step to return the per-example losses, a [B] tensor "
                "(e.g. F.cross_entropy(logits, y, reduction='none')), or a dict with them under 'loss'."
            )
        self._per_example_losses = losses
        return {**output, "loss": losses.mean()} if isinstance(output, dict) else losses.mean()

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._clipper is not None:  # book-keeping: one ordinary backward, then the clipped sums into .grad
            result = super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
            self._clipper.stop()
            if self._rows:  # not an empty batch
                self._count_nonfinite(self._clipper.clip_and_sum(self._rows))
            return result
        losses, self._per_example_losses = self._per_example_losses, None
        if losses is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        # Ghost clipping (Li et al.; Bu et al.): the first pass gives each example's gradient norm without
        # materialising the gradient, the second back-propagates the losses weighted by their clip factors.
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        losses.mean().backward(retain_graph=True)
        self.optimizers[0].zero_grad()
        for p in self._hooks.trainable_parameters:  # unused in this forward: its per-example norms are zero
            if not hasattr(p, "_norm_sample"):
                p._norm_sample = torch.zeros(len(losses), device=p.device)
        factors = self._hooks.get_clipping_coef()
        if not bool(torch.isfinite(factors).all()):  # ghost clipping can't zero one example: stop before a release
            raise RuntimeError(
                "An example's gradient is not finite, and grad_sample_mode='ghost' can't leave it out of the clipped "
                "sum (a NaN loss poisons the second backward pass): training stops before this step is released. "
                "Use grad_sample_mode='hooks', which zeroes non-finite per-example gradients, or clean the data."
            )
        for p in self._hooks.trainable_parameters:  # a layer skipped next time must not reuse these norms
            if hasattr(p, "_norm_sample"):
                del p._norm_sample
        self._hooks.disable_hooks()
        (factors.to(losses.device) * losses).sum().backward()
        return self.precision_plugin.post_backward(closure_loss, module)

    def _virtual_steps(self, batch: Any, batch_idx: int) -> Any:
        """Clip-and-sum every physical part but the last here; the last goes through Lightning's step as usual."""
        size, limit = batch_size(batch), self.max_physical_batch_size
        assert limit is not None
        starts = list(range(0, size, limit))
        optimizer = self.optimizers[0]
        self._clear_per_example_state()  # Lightning zeroes them only after training_step
        module = self.lightning_module
        for start in starts[:-1]:
            part = self._flat_views(select_examples(batch, slice(start, start + limit)))
            # only the last part logs (and may sync logs across processes, which run different part counts)
            with (
                self._without_ddp_gradient_sync(),
                self.precision_plugin.train_step_context(),
                captured_logging(module),
            ):
                output = _refuse_skipped_step(module.training_step(part, batch_idx))
            loss_from_output(output, "training_step").backward()
            self._carry(optimizer, batch_size(part))
        return select_examples(batch, slice(starts[-1], size))

    def _carry(self, optimizer: Any, rows: int) -> None:
        """Clip and sum the physical part just back-propagated; keep the sums for the step, free the rest."""
        if self._clipper is None:
            optimizer.carry_clipped_sums()
            return
        self._clipper.stop()
        self._count_nonfinite(self._clipper.clip_and_sum(rows, carry=True))
        self._clipper.start()

    def _clear_per_example_state(self) -> None:
        if self._clipper is not None:
            self._clipper.discard()
        else:
            self.optimizers[0].clear_per_example_state()

    def _count_nonfinite(self, norms: torch.Tensor) -> None:
        """Examples whose gradient was not finite (they contributed zero): counted over the run, reported once."""
        optimizer = self.optimizers[0]
        optimizer.nonfinite_examples = getattr(optimizer, "nonfinite_examples", 0) + (~norms.isfinite()).sum()

    def _engine_on(self) -> None:
        if self._clipper is not None:
            self._clipper.start()
        else:
            self._hooks.enable_hooks()

    def _engine_off(self) -> None:
        """Callbacks that differentiate the module outside training steps must not meet the engine's hooks."""
        if self._clipper is not None:
            self._clipper.stop()
        elif self._hooks is not None:
            self._hooks.disable_hooks()

    def _flat_views(self, batch: Any) -> Any:
        """``[B, K, ...]`` -> ``[B * K, ...]`` for every tensor of a batch of augmented views."""
        if self.augmentation_multiplicity == 1:
            return batch
        return map_examples(batch, lambda t: t.flatten(0, 1) if t.ndim >= 2 else t)

    def _empty_step(self) -> torch.Tensor:
        """An empty Poisson batch is still a step: zero per-example gradients, so the update is the noise alone.

        The module's ``training_step`` is not called (its loss and metrics would be NaN or fail on 0 examples); the
        optimizer gives every parameter without a gradient a zero one (0 examples here).
        """
        return torch.zeros((), device=self.root_device, requires_grad=True)

    def _without_ddp_gradient_sync(self) -> Any:
        model = self.model
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        try:
            return self._private_step(optimizer, closure, model, **kwargs)
        finally:
            self._engine_off()
            self._forget_private_state()

    def _forget_private_state(self, gradients: bool = False) -> None:
        """Drop everything derived from the private batch without noise (with ``gradients``, also ``.grad``).

        Opacus leaves the clipped sum (``summed_grad``), per-example gradients and norms on the parameters and the
        layers' inputs (``activations``) on the modules; they would travel with ``torch.save(module)``.
        """
        for p in self.lightning_module.parameters():
            for name in _PER_EXAMPLE_ATTRIBUTES:
                if name in vars(p):
                    delattr(p, name)
            if gradients:
                p.grad = None
        for submodule in self.lightning_module.modules():
            for name in ("activations", "max_batch_len"):
                if name in vars(submodule):
                    delattr(submodule, name)
        if self._hooks is not None and hasattr(self._hooks, "_per_sample_gradient_norms"):
            self._hooks._per_sample_gradient_norms = None
        if self._clipper is not None:
            self._clipper.discard()
        self._per_example_losses = None
        for optimizer in self.optimizers:
            if hasattr(optimizer, "discard"):
                optimizer.discard()

    def _private_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if not self._budget_exhausted():
            self._seed_noise(optimizer)
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        # Lightning insists that the closure runs; its results are discarded and nothing of it is logged.
        module = self.lightning_module
        with captured_logging(module), frozen_metrics(module):
            closure()
        optimizer.zero_grad()
        if hasattr(optimizer, "discard"):
            optimizer.discard()
        module.trainer.should_stop = True
        self._skipped_steps += 1
        rank_zero_warn(f"DP budget reached: one more step would exceed epsilon={self.target_epsilon}; stopping.")
        return None

    def _seed_noise(self, optimizer: Any) -> None:
        """With ``seed=`` (reproducible runs, warned), each step's noise comes from ``(seed, step)``: a resumed run
        adds the noise the uninterrupted run added. Otherwise Opacus draws it (securely with ``secure_mode``)."""
        if self.seed is None or self.secure_mode:
            return
        step = self.lightning_module.trainer.global_step
        generator = torch.Generator(device=self.root_device)
        optimizer.generator = generator.manual_seed(hash((self.seed, "noise", step)) % 2**62)

    def _budget_exhausted(self) -> bool:
        if self.target_epsilon is None or not self.stop_at_budget:
            return False
        steps = _steps_taken(self.accountant)
        if self._plan is not None and self._plan == self._plan_key(self._plan[0]) and steps + 1 <= self._plan[0]:
            return False  # the noise was calibrated for these steps at this rate, target and delta
        trial = make_accountant(self.accountant_name)
        trial.load_state_dict(self.accountant.state_dict())
        trial.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return epsilon_of(trial, self.delta) > self.target_epsilon

    def _plan_key(self, steps: int) -> tuple[Any, ...]:
        return (steps, self.sample_rate, self.noise_multiplier, self.target_epsilon, self.delta, self.accountant_name)

    def _after_noise(self, optimizer: DPOptimizer) -> None:
        self.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)
        trainer = self.lightning_module.trainer
        if self.log_clip_fraction and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            norms = self._per_example_norms(optimizer)
            if norms is not None and len(norms):
                log_scalars(trainer, {"dp/clip_fraction": float((norms > self.max_grad_norm).float().mean())})

    def _per_example_norms(self, optimizer: Any) -> torch.Tensor | None:
        if self._clipper is not None:
            return self._clipper.last_norms
        if self.grad_sample_mode == "ghost":
            return getattr(self._hooks, "per_sample_gradient_norms", None)
        samples = optimizer.grad_samples
        if not samples or not len(samples[0]):  # no example in this batch
            return None
        return torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
        if batch_idx == 0:
            self._log_privacy()

    @override
    def on_train_end(self) -> None:
        super().on_train_end()  # type: ignore[misc]
        self._log_privacy()
        optimizer = self.optimizers[0] if self.optimizers else None
        zeroed = int(getattr(optimizer, "nonfinite_examples", 0))
        if optimizer is not None:
            optimizer.nonfinite_examples = 0  # released once, in this warning, and kept nowhere
        if zeroed:
            rank_zero_warn(
                f"{zeroed} per-example gradient(s) in this run were not finite (NaN or inf) and were left out of the "
                "clipped sums (each such example contributed zero; the sensitivity stays max_grad_norm). The count "
                "is over the whole run and is not covered by the guarantee. Check the data and the loss."
            )
        setattr(
            self.lightning_module,
            _MODULE_LEDGER,
            {"epsilon": self.epsilon, "delta": self.delta, "history": list(self.accountant.history)},
        )

    def _log_privacy(self) -> None:
        trainer = self.lightning_module.trainer
        log_scalars(
            trainer,
            {
                "dp/epsilon": self.epsilon,
                "dp/delta": self.delta,
                "dp/noise_multiplier": self.noise_multiplier,
                "dp/sample_rate": self.sample_rate or 0.0,
            },
        )

    # -- checkpoints and teardown ------------------------------------------------------------------------

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any = None) -> None:
        checkpoint[_CHECKPOINT_KEY] = {
            "ledger": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "plan": self._plan,
            "skipped_steps": self._skipped_steps,
        }
        super().save_checkpoint(checkpoint, filepath, storage_options)  # type: ignore[misc]

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=False)  # type: ignore[misc]
        saved = checkpoint.get(_CHECKPOINT_KEY)
        if saved is None:
            raise RuntimeError(
                f"{checkpoint_path} has no privacy ledger (it was not saved by a DP strategy), so the privacy spent "
                "before it is unknown: resuming privately from it would under-report epsilon."
            )
        ledger = make_accountant(self.accountant_name)
        ledger.load_state_dict(saved["ledger"])
        steps, spent = _steps_taken(ledger), _steps_taken(self.accountant)
        if steps < spent and self.lightning_module.trainer.state.fn != TrainerFn.FITTING:
            return checkpoint  # evaluating an earlier checkpoint after fit: the run's ledger stays, it never shrinks
        if steps < spent:
            raise RuntimeError(
                f"Restoring {checkpoint_path} would roll the privacy ledger back from {spent} to {steps} noisy steps, "
                "but the steps after the checkpoint were released. Restoring an earlier checkpoint in the middle of "
                "a private run (as tuners do) is refused; start a new run from it instead."
            )
        check_ledger(saved, checkpoint, steps)
        self.noise_multiplier = float(saved["noise_multiplier"])
        self._plan = tuple(saved["plan"]) if saved.get("plan") is not None else None
        self._skipped_steps = int(saved.get("skipped_steps", 0))
        self.accountant.load_state_dict(saved["ledger"])
        return checkpoint

    @override
    def on_exception(self, exception: BaseException) -> None:
        # a step interrupted between its backward pass and its noise leaves raw gradients on the parameters
        if self._hooks is not None or self._clipper is not None:
            self._engine_off()
            self._forget_private_state(gradients=True)
        super().on_exception(exception)  # type: ignore[misc]

    @override
    def teardown(self) -> None:
        if self._hooks is not None:
            self._hooks.cleanup()
            self._forget_private_state()
            self._hooks = None
        if self._clipper is not None:
            self._clipper.stop()
            self._forget_private_state()
            self._clipper = None
        super().teardown()  # type: ignore[misc]


class _CarryClippedSums:
    """DPOptimizer that keeps the clipped sums of earlier physical batches across Lightning's ``zero_grad``.

    It also makes every example's contribution bounded by ``max_grad_norm`` whatever the batch holds: a parameter
    without per-example gradients (unused in this forward) counts as a zero gradient, and an example whose
    gradient is not finite contributes zero (counted over the run in ``nonfinite_examples``, without a sync).
    """

    views: int = 1
    nonfinite_examples: torch.Tensor | int = 0

    def carry_clipped_sums(self) -> None:
        """Clip and sum the per-example gradients of the physical batch just back-propagated, and free them."""
        self.zero_for_unused_parameters()
        self.clip_and_accumulate()  # type: ignore[attr-defined]
        carried = getattr(self, "_carried", None) or {}
        for p in self.params:  # type: ignore[attr-defined]
            carried[p] = carried[p] + p.summed_grad if p in carried else p.summed_grad
            p.summed_grad, p.grad_sample = None, None
        self._carried = carried

    def clip_and_accumulate(self) -> None:
        samples = self.per_example_gradients()
        for p, sample in zip(self.params, samples):  # type: ignore[attr-defined]
            p.grad_sample = sample
        super().clip_and_accumulate()  # type: ignore[misc]
        for p, total in (getattr(self, "_carried", None) or {}).items():
            if p.summed_grad is not None and getattr(self, "_in_step", False):
                p.summed_grad += total

    def per_example_gradients(self) -> list[torch.Tensor]:
        """One fp32 ``[B, *p.shape]`` gradient per parameter, each example's views averaged, non-finite ones zero.

        fp32 norms and clip factors: under bf16 autocast they would let a clipped gradient exceed C.
        """
        params = self.params  # type: ignore[attr-defined]
        samples = []
        for p in params:
            sample = self._get_flat_grad_sample(p).float()  # type: ignore[attr-defined]
            if self.views > 1:  # one example's K views: average their gradients, then clip as one example
                sample = sample.reshape(-1, self.views, *p.shape).mean(dim=1)
            samples.append(sample)
        # an example is dropped if any of its norms is not finite (NaN, inf, or an fp32 overflow of a huge gradient)
        norms = torch.stack([s.reshape(len(s), math.prod(p.shape)).norm(dim=1) for p, s in zip(params, samples)])
        dropped = ~norms.isfinite().all(dim=0)
        self.nonfinite_examples = self.nonfinite_examples + dropped.sum()
        for sample in samples:  # in place: no second copy of the per-example gradients
            sample.masked_fill_(dropped.view(-1, *([1] * (sample.ndim - 1))), 0.0)
        return samples

    def zero_for_unused_parameters(self) -> None:
        """A parameter the forward didn't use has no per-example gradient: give it zeros (safe: it adds nothing)."""
        params = self.params  # type: ignore[attr-defined]
        present = [p for p in params if getattr(p, "grad_sample", None) is not None]
        rows = len(self._get_flat_grad_sample(present[0])) if present else 0  # type: ignore[attr-defined]
        for p in params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = p.new_zeros((rows, *p.shape))

    def discard(self) -> None:
        """Forget the clipped sums carried from earlier physical batches (the step is not taken)."""
        self._carried = {}

    def clear_per_example_state(self) -> None:
        for p in self.params:  # type: ignore[attr-defined]
            p.grad_sample, p.summed_grad = None, None

    def pre_step(self, closure: Any = None) -> Any:
        self.zero_for_unused_parameters()
        self._in_step = True
        try:
            return super().pre_step(closure)  # type: ignore[misc]
        finally:
            self._in_step = False
            self._carried = {}


class _CarryingDPOptimizer(_CarryClippedSums, DPOptimizer):
    pass


class _CarryingDistributedDPOptimizer(_CarryClippedSums, DistributedDPOptimizer):
    pass


class _ZeroForUnusedParameters:
    """DPOptimizer over clipped sums already in ``.grad`` (ghost clipping, book-keeping) for which a parameter without
    a gradient (unused in this forward) has gradient 0."""

    def pre_step(self, closure: Any = None) -> Any:
        for p in self.params:  # type: ignore[attr-defined]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if "summed_grad" not in vars(p):  # removed after every step (nothing un-noised stays behind)
                p.summed_grad = None
        return super().pre_step(closure)  # type: ignore[misc]


class _GhostDPOptimizer(_ZeroForUnusedParameters, DPOptimizerFastGradientClipping):
    pass


class _GhostDistributedDPOptimizer(_ZeroForUnusedParameters, DistributedDPOptimizerFastGradientClipping):
    pass


def _book_keeping_clipper(module: nn.Module, max_grad_norm: float, views: int) -> BookKeepingClipper:
    """The single-backward engine for ``module``, or a refusal before the first step naming the layer and the fix."""
    try:
        return BookKeepingClipper(module, max_grad_norm, loss_reduction="mean", group_size=views)
    except ValueError as error:
        raise RuntimeError(f"grad_sample_mode='bk' can't clip this module: {error}") from error


def _steps_taken(accountant: Any) -> int:
    return sum(steps for _, _, steps in accountant.history)


def _refuse_skipped_step(output: Any) -> Any:
    """Refuse a ``None`` from ``training_step``: under DP, whether a step happens must not depend on the batch."""
    if output is None or (isinstance(output, dict) and output.get("loss") is None):
        raise RuntimeError(
            "training_step returned None under DP-SGD. Skipping a step because of what is in the batch releases, "
            "without noise, whether the batch held such examples (and the step would go unaccounted). Return a "
            "loss for every batch: empty batches are handled by the strategy, and examples with a non-finite "
            "gradient contribute zero."
        )
    return output


def _length(dataloader: Any) -> int | None:
    try:
        return len(dataloader)
    except TypeError:
        return None


class DPStrategy(_DifferentialPrivacy, SingleDeviceStrategy):
    """DP-SGD on one device. ``Trainer(strategy="dp_sgd")`` gives the defaults.

    Args:
        noise_multiplier: noise std over ``max_grad_norm`` (ignored when ``target_epsilon`` is given).
        target_epsilon: calibrate the noise so that the planned steps (``max_steps`` or ``max_epochs``) spend at
            most this epsilon, and stop before it would be exceeded (``stop_at_budget``).
        delta: the delta of the guarantee.
        max_grad_norm: per-example gradient clipping norm ``C``.
        accountant: ``"prv"`` (default, tight upper bound), ``"rdp"`` or ``"gdp"`` (approximate).
        grad_sample_mode: the per-example clipping engine: Opacus's ``"hooks"``, ``"ew"``, ``"functorch"``, or
            ``"ghost"`` (ghost clipping: ``training_step`` returns the ``[B]`` per-example losses, the strategy runs
            the two backward passes), or ``"bk"``: the single-backward book-keeping engine
            (:class:`~lightning_nt.privacy.book_keeping.BookKeepingClipper`; ``training_step`` unchanged, one ordinary
            backward, per-layer ghost or instantiated norms, no weight gradient formed twice).
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
        secure_mode: Opacus's secure noise and OS-drawn sampling seeds.
        fix_modules: let Opacus replace incompatible modules (BatchNorm -> GroupNorm) before training.
        seed: seed of the Poisson sampler, for reproducible experiments only (warned: the accounting assumes the
            batches are secret); ``None`` (default) draws a fresh seed from the OS for every loader.
        allow_nonprivate_callbacks: let callbacks that read the training data outside DP-SGD (those that declare
            ``reads_training_data_outside_step``: GradInit, SharpnessMonitor, CompressionBoundReporter) run; their
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
    ``allow_nonprivate_callbacks``, nor the choice of hyper-parameters by repeated runs. Coupling between the
    examples of a batch written by hand (``x - x.mean(0)`` in ``forward``, a loss over pairs) breaks the
    per-example sensitivity bound without any module check noticing (use ``sensitivity_probe``). A new Trainer
    starts a fresh ledger: resume with ``fit(ckpt_path=...)`` to continue one (a warning says when a module that
    was already trained privately is trained again without it).

    Example::

        trainer = pl.Trainer(max_epochs=10, strategy=DPStrategy(target_epsilon=8.0, delta=1e-5))
        trainer.fit(model)
        trainer.strategy.epsilon   # <= 8.0, also logged as dp/epsilon
    """

    strategy_name = "dp_sgd"

    @override
    def setup_environment(self) -> None:
        if not self._device_given and isinstance(self.accelerator, CUDAAccelerator):
            self._root_device = torch.device("cuda", torch.cuda.current_device())
        super().setup_environment()


class DPDDPStrategy(_DifferentialPrivacy, DDPStrategy):
    """DP-SGD over several processes (DDP); same arguments as :class:`DPStrategy`. ``strategy="dp_sgd_ddp"``.

    Every process Poisson-samples its shard of one global batch (all stay in lockstep, empty batches included);
    each clips its examples' gradients, process 0 adds the one noise draw, and the sum is all-reduced.
    Every process keeps an identical accountant.
    """

    strategy_name = "dp_sgd_ddp"


def register_strategies() -> None:
    """Register ``"dp_sgd"`` and ``"dp_sgd_ddp"`` with Lightning's strategy registry (idempotent)."""
    for name, strategy, description in (
        ("dp_sgd", DPStrategy, "DP-SGD (Opacus) on one device"),
        ("dp_sgd_ddp", DPDDPStrategy, "DP-SGD (Opacus) with DDP"),
    ):
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, strategy, description=description)
