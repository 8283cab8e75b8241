"""DP-SGD for any LightningModule, switched on by the Trainer's ``strategy`` flag (Opacus underneath).

What the strategy does, on one device (:class:`DPStrategy`) or many (:class:`DPDDPStrategy`):

* fails closed before the first step on settings that would break the guarantee (BatchNorm and other
  modules Opacus can't handle, gradient accumulation, Trainer gradient clipping, fp16 with a GradScaler,
  manual optimization, several optimizers, iterable datasets without a sample rate);
* attaches Opacus's per-sample-gradient hooks to the module itself (no wrapper) and wraps the optimizer in
  Opacus's ``DPOptimizer`` (clip each example's gradient to ``max_grad_norm``, add one Gaussian noise draw of
  std ``noise_multiplier * max_grad_norm``, divide by the expected batch size);
* replaces the train loader's sampler by Poisson sampling at rate ``q`` (same dataset and collate), keeping
  empty batches as steps, sharded so that data-parallel processes stay in lockstep;
* keeps the accountant's ledger, reports ``dp/epsilon`` and friends, stops before ``target_epsilon`` would
  be exceeded, and puts the ledger into checkpoints (a checkpoint without it refuses to resume).
"""

from __future__ import annotations

import contextlib
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
from opacus.validators import ModuleValidator
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
    check_choice,
    frozen_metrics,
    log_scalars,
    loss_from_output,
    map_examples,
    select_examples,
)
from lightning_nt.privacy.accounting import AccountantName, calibrate_noise, epsilon_of, make_accountant
from lightning_nt.privacy.sampling import poisson_dataloader

__all__ = ["DPDDPStrategy", "DPStrategy"]

GradSampleMode = Literal["hooks", "ew", "functorch", "ghost"]
_ALLOWED_PRECISION = ("32-true", "32", "bf16-mixed")
_CHECKPOINT_KEY = "dp_accountant"


class _DifferentialPrivacy:
    """The DP-SGD behaviour shared by the single-device and the DDP strategy."""

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
        **strategy_kwargs: Any,
    ) -> None:
        """See :class:`DPStrategy` for the arguments; ``strategy_kwargs`` go to the Lightning strategy."""
        super().__init__(**strategy_kwargs)
        if noise_multiplier < 0:
            raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier}.")
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"`target_epsilon` must be > 0, got {target_epsilon}.")
        if not 0 < delta < 1:
            raise ValueError(f"`delta` must be in (0, 1), got {delta}.")
        if not max_grad_norm > 0:
            raise ValueError(f"`max_grad_norm` must be > 0, got {max_grad_norm}.")
        check_choice("grad_sample_mode", grad_sample_mode, ("hooks", "ew", "functorch", "ghost"))
        if grad_sample_mode == "ghost" and (max_physical_batch_size is not None or augmentation_multiplicity != 1):
            raise ValueError(
                "`grad_sample_mode='ghost'` can't be combined with `max_physical_batch_size` or "
                "`augmentation_multiplicity`: use 'hooks' for those."
            )
        if sample_rate is not None and not 0 < sample_rate <= 1:
            raise ValueError(f"`sample_rate` must be in (0, 1], got {sample_rate}.")
        if max_physical_batch_size is not None and max_physical_batch_size < 1:
            raise ValueError(f"`max_physical_batch_size` must be >= 1 or None, got {max_physical_batch_size}.")
        if augmentation_multiplicity < 1:
            raise ValueError(f"`augmentation_multiplicity` must be >= 1, got {augmentation_multiplicity}.")
        if accountant == "gdp":
            rank_zero_warn("accountant='gdp' is a central-limit approximation and can under-report epsilon.")
        self.noise_multiplier, self.target_epsilon, self.delta = noise_multiplier, target_epsilon, delta
        self.max_grad_norm, self.accountant_name, self.grad_sample_mode = max_grad_norm, accountant, grad_sample_mode
        self.sample_rate, self.poisson_sampling, self.stop_at_budget = sample_rate, poisson_sampling, stop_at_budget
        self.secure_mode, self.fix_modules, self.seed = secure_mode, fix_modules, seed
        self.allow_nonprivate_callbacks = allow_nonprivate_callbacks
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
        self._plan: tuple[Any, ...] | None = None
        self._per_example_losses: torch.Tensor | None = None
        self._loaders_made = 0

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (an upper bound with the 'prv' and 'rdp' accountants)."""
        return epsilon_of(self.accountant, self.delta)

    # -- set-up --------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            _check_trainer(trainer)
            self._check_precision(trainer)
            self._check_callbacks(trainer)
            self._check_module(self.lightning_module)
        super().setup(trainer)  # type: ignore[misc]
        if trainer.state.fn == TrainerFn.FITTING:
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

    def _check_callbacks(self, trainer: pl.Trainer) -> None:
        from lightning_nt.compression import CompressionBoundReporter
        from lightning_nt.gradinit import GradInit
        from lightning_nt.sharpness import SharpnessMonitor

        nonprivate = GradInit | SharpnessMonitor | CompressionBoundReporter
        readers = [type(c).__name__ for c in trainer.callbacks if isinstance(c, nonprivate)]
        if not readers:
            return
        message = (
            f"{', '.join(readers)} compute(s) on the training data outside DP-SGD, so what they log or change is "
            "not covered by the privacy guarantee"
        )
        if not self.allow_nonprivate_callbacks:
            raise RuntimeError(f"{message}. Remove them, or pass allow_nonprivate_callbacks=True to accept that.")
        rank_zero_warn(f"{message} (allow_nonprivate_callbacks=True).")

    def _check_module(self, module: nn.Module) -> None:
        errors = ModuleValidator.validate(module, strict=False)
        coupled = [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not errors and not coupled:
            return
        if self.fix_modules:
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
            "Replace BatchNorm by GroupNorm (or pass fix_modules=True to let Opacus swap the modules before training)."
        )

    @override
    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)  # type: ignore[misc]  # Lightning refuses several optimizers here
        distributed = trainer.world_size > 1
        if self.grad_sample_mode == "ghost":
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
        """A fresh seed for every loader (reloads and resumes never replay batches), the same on every process.

        Without an explicit ``seed`` it comes from the OS, so that batch membership stays secret, as the privacy
        amplification by sampling assumes.
        """
        self._loaders_made += 1
        if self.seed is None or self.secure_mode:
            value = torch.tensor(secrets.randbits(62), device=trainer.strategy.root_device)
            return int(trainer.strategy.broadcast(value, src=0))
        return hash((self.seed, trainer.global_step, self._loaders_made)) % 2**62

    def _calibrate(self, trainer: pl.Trainer, steps_per_epoch: int | None) -> None:
        optimizer = self.optimizers[0]
        if self.target_epsilon is None:
            if self.noise_multiplier == 0:
                rank_zero_warn("noise_multiplier=0: no privacy at all, epsilon is reported as inf.")
            return
        if trainer.max_steps and trainer.max_steps > 0:
            planned = trainer.max_steps
        elif trainer.max_epochs is not None and trainer.max_epochs > 0 and steps_per_epoch:
            planned = trainer.max_epochs * steps_per_epoch
        else:
            raise RuntimeError("target_epsilon needs a finite plan: set the Trainer's max_steps or max_epochs.")
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
        if batch is not None and batch_size(batch) == 0:
            return self._empty_step()
        self._hooks.enable_hooks()
        if batch is not None and self.max_physical_batch_size is not None:
            batch = self._virtual_steps(batch, args[1] if len(args) > 1 else 0)
        if batch is not None:
            args = (self._flat_views(batch), *args[1:])
        with self._without_ddp_gradient_sync():  # the DP optimizer reduces the clipped, noised gradients itself
            output = super().training_step(*args, **kwargs)  # type: ignore[misc]
        return self._stash_per_example_losses(output) if self.grad_sample_mode == "ghost" else output

    def _stash_per_example_losses(self, output: Any) -> Any:
        """Ghost clipping: keep the ``[B]`` losses for the two backward passes, hand Lightning their mean."""
        if output is None:
            return None
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
        losses, self._per_example_losses = self._per_example_losses, None
        if losses is None:
            return super().backward(closure_loss, optimizer, *args, **kwargs)  # type: ignore[misc]
        # Ghost clipping (Li et al.; Bu et al.): the first pass gives each example's gradient norm without
        # materialising the gradient, the second back-propagates the losses weighted by their clip factors.
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        losses.mean().backward(retain_graph=True)
        self.optimizers[0].zero_grad()
        factors = self._hooks.get_clipping_coef()
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
        optimizer: _CarryingDPOptimizer = self.optimizers[0]
        optimizer.clear_per_example_state()  # Lightning zeroes them only after training_step
        module = self.lightning_module
        for start in starts[:-1]:
            part = self._flat_views(select_examples(batch, slice(start, start + limit)))
            # only the last part logs (and may sync logs across processes, which run different part counts)
            with (
                self._without_ddp_gradient_sync(),
                self.precision_plugin.train_step_context(),
                captured_logging(module),
            ):
                output = module.training_step(part, batch_idx)
            loss_from_output(output, "training_step").backward()
            optimizer.carry_clipped_sums()
        return select_examples(batch, slice(starts[-1], size))

    def _flat_views(self, batch: Any) -> Any:
        """``[B, K, ...]`` -> ``[B * K, ...]`` for every tensor of a batch of augmented views."""
        if self.augmentation_multiplicity == 1:
            return batch
        return map_examples(batch, lambda t: t.flatten(0, 1) if t.ndim >= 2 else t)

    def _empty_step(self) -> torch.Tensor:
        """An empty Poisson batch is still a step: zero per-example gradients, so the update is the noise alone.

        The module's ``training_step`` is not called (its loss and metrics would be NaN or fail on 0 examples).
        """
        parameters = [p for p in self.lightning_module.parameters() if p.requires_grad]

        def zero_per_example_gradients(gradient: torch.Tensor) -> torch.Tensor:
            for p in parameters:  # Lightning zeroes the gradients between the step and the backward: set them here
                p.grad_sample = p.new_zeros((0, *p.shape))
                p.grad = torch.zeros_like(p)  # what ghost clipping's optimizer reads
            return gradient

        loss = torch.zeros((), device=self.root_device, requires_grad=True)
        loss.register_hook(zero_per_example_gradients)
        return loss

    def _without_ddp_gradient_sync(self) -> Any:
        model = self.model
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        try:
            return self._private_step(optimizer, closure, model, **kwargs)
        finally:  # callbacks that differentiate the module outside training steps must not meet Opacus's hooks
            self._hooks.disable_hooks()

    def _private_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if not self._budget_exhausted():
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        # Lightning insists that the closure runs; its results are discarded and nothing of it is logged.
        module = self.lightning_module
        with captured_logging(module), frozen_metrics(module):
            closure()
        optimizer.zero_grad()
        if hasattr(optimizer, "discard"):
            optimizer.discard()
        module.trainer.should_stop = True
        rank_zero_warn(f"DP budget reached: one more step would exceed epsilon={self.target_epsilon}; stopping.")
        return None

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
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            norms = self._per_example_norms(optimizer)
            if norms is not None and len(norms):
                log_scalars(trainer, {"dp/clip_fraction": float((norms > self.max_grad_norm).float().mean())})

    def _per_example_norms(self, optimizer: Any) -> torch.Tensor | None:
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
        self.noise_multiplier = float(saved["noise_multiplier"])
        self._plan = tuple(saved["plan"]) if saved.get("plan") is not None else None
        self.accountant.load_state_dict(saved["ledger"])
        return checkpoint

    @override
    def teardown(self) -> None:
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
        super().teardown()  # type: ignore[misc]


class _CarryClippedSums:
    """DPOptimizer that keeps the clipped sums of earlier physical batches across Lightning's ``zero_grad``."""

    def carry_clipped_sums(self) -> None:
        """Clip and sum the per-example gradients of the physical batch just back-propagated, and free them."""
        self.clip_and_accumulate()  # type: ignore[attr-defined]
        carried = getattr(self, "_carried", None) or {}
        for p in self.params:  # type: ignore[attr-defined]
            carried[p] = carried[p] + p.summed_grad if p in carried else p.summed_grad
            p.summed_grad, p.grad_sample = None, None
        self._carried = carried

    views: int = 1

    def clip_and_accumulate(self) -> None:
        for p in self.params:  # type: ignore[attr-defined]
            # fp32 norms and clip factors: under bf16 autocast they would let a clipped gradient exceed C
            sample = self._get_flat_grad_sample(p).float()  # type: ignore[attr-defined]
            if self.views > 1:  # one example's K views: average their gradients, then clip as one example
                sample = sample.reshape(-1, self.views, *p.shape).mean(dim=1)
            p.grad_sample = sample
        super().clip_and_accumulate()  # type: ignore[misc]
        for p, total in (getattr(self, "_carried", None) or {}).items():
            if p.summed_grad is not None and getattr(self, "_in_step", False):
                p.summed_grad += total

    def discard(self) -> None:
        """Forget the clipped sums carried from earlier physical batches (the step is not taken)."""
        self._carried = {}

    def clear_per_example_state(self) -> None:
        for p in self.params:  # type: ignore[attr-defined]
            p.grad_sample, p.summed_grad = None, None

    def pre_step(self, closure: Any = None) -> Any:
        no_backward = all(getattr(p, "grad_sample", None) is None for p in self.params)  # type: ignore[attr-defined]
        if _anywhere(no_backward, self.params[0].device):  # type: ignore[attr-defined]
            self.discard()  # training_step returned None: no backward, no step, nothing released or spent
            return False
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


class _SkipWithoutGradients:
    """Ghost-clipping DPOptimizer that takes no step (and spends nothing) when no backward ran."""

    def pre_step(self, closure: Any = None) -> Any:
        if _anywhere(all(p.grad is None for p in self.params), self.params[0].device):  # type: ignore[attr-defined]
            return False
        return super().pre_step(closure)  # type: ignore[misc]


class _GhostDPOptimizer(_SkipWithoutGradients, DPOptimizerFastGradientClipping):
    pass


class _GhostDistributedDPOptimizer(_SkipWithoutGradients, DistributedDPOptimizerFastGradientClipping):
    pass


def _anywhere(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on any (so that all skip a step together instead of hanging)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _fix_in_place(module: nn.Module) -> None:
    """Replace every submodule Opacus has a fixer for (BatchNorm -> GroupNorm, ...), affine or not, in place."""
    for name, submodule in list(module.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(submodule))
        if fixer is None or not name:
            continue
        parent_name, _, child = name.rpartition(".")
        replacement = fixer(submodule)
        device = next(iter(submodule.buffers()), torch.empty(0)).device
        setattr(module.get_submodule(parent_name), child, replacement.to(device))


def _steps_taken(accountant: Any) -> int:
    return sum(steps for _, _, steps in accountant.history)


def _check_trainer(trainer: pl.Trainer) -> None:
    if trainer.precision not in _ALLOWED_PRECISION:
        raise RuntimeError(
            f"DP-SGD can't run with precision={trainer.precision!r}: Opacus rewrites the gradients after the fp16 "
            "GradScaler, which then scales the noisy update wrongly. Use precision='32-true' or 'bf16-mixed'."
        )
    if trainer.accumulate_grad_batches != 1:
        raise RuntimeError(
            f"accumulate_grad_batches={trainer.accumulate_grad_batches} breaks Poisson sampling's accounting; "
            "use a larger batch (sample rate) instead."
        )
    if trainer.gradient_clip_val:
        raise RuntimeError(
            "The Trainer's gradient_clip_val clips the noisy averaged gradient, not each example's: remove it and "
            "set the strategy's max_grad_norm instead."
        )
    if not trainer.lightning_module.automatic_optimization:
        raise RuntimeError("DP-SGD needs automatic optimization: the strategy steps the DP optimizer itself.")


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
        grad_sample_mode: Opacus's per-sample gradient engine: ``"hooks"``, ``"ew"``, ``"functorch"``, or ``"ghost"``
            (ghost clipping: ``training_step`` returns the ``[B]`` per-example losses, the strategy runs the two
            backward passes; no per-example gradient is materialised).
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
        allow_nonprivate_callbacks: let callbacks that read the training data outside DP-SGD (GradInit,
            SharpnessMonitor, CompressionBoundReporter) run; their logs are then not covered by the guarantee (warned).
        strategy_kwargs: passed on to Lightning's ``SingleDeviceStrategy`` (``DDPStrategy`` for ``DPDDPStrategy``),
            e.g. ``device``, the device to train on (default: the Trainer accelerator's first device).

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
