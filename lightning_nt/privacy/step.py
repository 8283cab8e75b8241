"""One private step (a DP-SGD stage): the logical batch through the clipping engine, then the one noisy update.

:class:`_PrivateStep` holds the DP strategy's per-step Lightning hooks, in the order they run:

1. ``training_step``: an empty Poisson batch is a step of noise alone; otherwise the engine starts recording,
   every physical part but the last is clipped and summed (:mod:`~lightning_nt.privacy.virtual_steps`), and the
   last part goes through the module's ``training_step`` (a ``None`` is refused);
2. ``backward``: the engine forms the clipped sum (one, two or the ordinary backward pass, by engine);
3. ``optimizer_step``: unless the budget is spent, Opacus's ``DPOptimizer`` adds the noise and the accountant
   records the step; the engine stops and forgets everything un-noised, whatever happened;
4. ``on_exception``: a step interrupted between its backward pass and its noise leaves raw gradients on the
   parameters: the engine stops and forgets them.

Under DDP, while some rank still has a fit's first-step checks to run, the ranks agree on their verdicts after
``training_step`` and after ``backward`` (:mod:`~lightning_nt.privacy.agreement`): a refusal found on one rank is
raised on every rank, before the noisy step. On the later steps a refusal met on one rank is held through the step
(:class:`~lightning_nt.privacy.agreement.LaterRefusals`: its update is all-NaN on every rank) and raised on every rank
at the start of the next one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from pytorch_lightning.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_nt.common import batch_size, captured_logging, frozen_metrics, loss_from_output, select_examples
from lightning_nt.privacy.accounting import (
    AccountantName,
    exceeds_budget,
    secret_noise,
    seeded_noise,
    steps_taken,
)
from lightning_nt.privacy.agreement import LaterRefusals, agree_across_ranks, raised_by_lightning_nt
from lightning_nt.privacy.engines import ClippingEngine
from lightning_nt.privacy.engines.uses import ParameterUses
from lightning_nt.privacy.guards import check_accumulation, check_sensitivity
from lightning_nt.privacy.independence import check_example_independence
from lightning_nt.privacy.module_guards import (
    check_batch_norm_in_eval,
    check_state_unchanged,
    naming_in_place_changes_of_hooked_outputs,
    state_versions,
)
from lightning_nt.privacy.reports import log_clip_fraction, warn_about_logging_from_the_batch
from lightning_nt.privacy.virtual_steps import flat_views, refuse_skipped_step, run_earlier_parts

__all__: list[str] = []

INDEPENDENCE_TRIES = 20
"""Batches of two examples or more, all the same, that the example-independence check waits through."""


class _PrivateStep:
    """The per-step hooks of the DP strategies (mixed into them before Lightning's strategy class)."""

    # set by the strategy's constructor (see DPStrategy), and from its set-up
    max_grad_norm: float
    noise_multiplier: float
    target_epsilon: float | None
    delta: float
    sample_rate: float | None
    max_physical_batch_size: int | None
    augmentation_multiplicity: int
    stop_at_budget: bool
    secure_mode: bool
    seed: int | None
    log_clip_fraction: bool
    accountant: Any
    accountant_name: AccountantName
    _engine: ClippingEngine | None
    _plan: tuple[Any, ...] | None
    _rows: int
    _skipped_steps: int
    _probe_pending: bool
    _independence_tries: int
    _first_step: bool
    _uses: ParameterUses | None
    _uses_checked: bool
    _warned_about_logging: bool
    _agreeing: bool  # under DDP: this step's checks are agreed across the ranks (the same on every rank)
    _later: LaterRefusals | None  # under DDP: a refusal met on one rank after the first steps

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._check_later_refusals()  # the last step's, before this step releases anything
        return self._agreed(lambda: self._checked_training_step(*args, **kwargs), last=False, held=self._empty_step)

    def _checked_training_step(self, *args: Any, **kwargs: Any) -> Any:
        with naming_in_place_changes_of_hooked_outputs():
            return self._private_training_step(*args, **kwargs)

    def _private_training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        self._rows = 0
        if batch is not None and batch_size(batch) == 0:
            return self._empty_step()
        engine = self._active_engine()
        self._start_recording(engine)
        batch_idx = args[1] if len(args) > 1 else 0
        if batch is not None and self._probe_pending and batch_size(batch) >= 2:
            self._probe_sensitivity(batch, batch_idx)
            self._probe_pending = False
        if batch is not None and self._independence_tries:
            self._try_example_independence(batch, batch_idx)
        state = state_versions(self.lightning_module, buffer_values=self._first_step)  # .data updates: once
        self._first_step = False
        self._watch_parameter_uses(engine)
        if batch is not None and self.max_physical_batch_size is not None:
            views, limit = self.augmentation_multiplicity, self.max_physical_batch_size
            module = self.lightning_module
            batch = run_earlier_parts(module, engine, batch, batch_idx, limit, views, self._physical_step)
        if batch is not None:
            args = (self._views(batch), *args[1:])
            self._rows = batch_size(args[0])
        with self._without_ddp_gradient_sync():  # the DP optimizer reduces the clipped, noised gradients itself
            output = refuse_skipped_step(super().training_step(*args, **kwargs))  # type: ignore[misc]
        self._check_parameter_uses(engine, output)
        check_state_unchanged(self.lightning_module, state)
        self._warn_about_logging_from_the_batch()
        return engine.take_output(output)

    def _start_recording(self, engine: ClippingEngine) -> None:
        """The checks before a step's forward pass, then the engine's recording; a refusal of theirs is raised, or,
        where refusals are held (:meth:`~lightning_nt.privacy.engines.ClippingEngine.refuse`), held: the step's
        ``training_step`` still runs, plainly, so that the module's own collectives in it meet the other ranks'."""
        try:
            engine.check_trainable_parameters()
            check_batch_norm_in_eval(self.lightning_module)
            check_accumulation(self.lightning_module.trainer)
            engine.start()
        except Exception as failure:
            if not raised_by_lightning_nt(failure):
                raise
            engine.refuse(failure)

    def _holds(self, refusal: Exception) -> bool:
        """Whether a refusal met during this step is held (under DDP, after the first steps: see :meth:`_held`)."""
        return self._later is not None and not self._agreeing and self._later.hold(refusal, refusal=True)

    def _watch_parameter_uses(self, engine: ClippingEngine) -> None:
        """Watch this step's forward passes for parameters used outside their layers' calls: on a fit's first
        step, and on every step where the engine's clipping would not bound such a use (ghost clipping)."""
        if engine.outside_uses_escape_clipping or not self._uses_checked:
            if self._uses is None:
                self._uses = ParameterUses(self.lightning_module, engine.trainable_ids)
            self._uses.begin()

    def _check_parameter_uses(self, engine: ClippingEngine, output: Any) -> None:
        if self._uses is not None and self._uses.active:
            engine.check_parameter_uses(self._uses.end(loss_from_output(output, "training_step")))
            self._uses_checked = True

    def _stop_watching_parameter_uses(self) -> None:
        if self._uses is not None:
            self._uses.end()

    def _active_engine(self) -> ClippingEngine:
        assert self._engine is not None, "the clipping engine is attached when a fit sets up its optimizer"
        return self._engine

    def _warn_about_logging_from_the_batch(self) -> None:
        """Once: what ``training_step`` and the module's other training hooks log is computed on the private batch
        without noise (outside the guarantee)."""
        if not self._warned_about_logging:
            self._warned_about_logging = warn_about_logging_from_the_batch(self.lightning_module.trainer)

    def _probe_sensitivity(self, batch: Any, batch_idx: int) -> None:
        """``sensitivity_probe=True``: one canary check of the per-example bound on a first batch (no release)."""
        with self._guard_passes(batch) as part:
            check_sensitivity(
                self.lightning_module, self.optimizers[0], part, batch_idx, self.max_grad_norm, prepare=self._views
            )

    def _try_example_independence(self, batch: Any, batch_idx: int) -> None:
        """Check this batch for layers that mix the examples (see :mod:`~lightning_nt.privacy.independence`), or count
        a batch of two or more examples, all the same; refuse the fit when ``INDEPENDENCE_TRIES`` such batches went by
        unchecked."""
        with self._guard_passes(batch) as part:
            checked = check_example_independence(
                self.lightning_module, self._active_engine(), part, batch_idx, prepare=self._views
            )
        if checked:
            self._independence_tries = 0
        elif batch_size(batch) >= 2:
            self._independence_tries -= 1
            if not self._independence_tries:
                raise RuntimeError(
                    f"DP-SGD's example-independence check found no two distinct examples in {INDEPENDENCE_TRIES} "
                    "batches, so it can't show that no layer mixes the examples: train on batches whose examples "
                    "differ."
                )

    @contextlib.contextmanager
    def _guard_passes(self, batch: Any) -> Iterator[Any]:
        """Where a guard runs its own passes of the step before it (no release): on the batch's first physical part,
        as the step's physical parts run, with no per-example state kept before or after (its batches are not this
        step's)."""
        if self.max_physical_batch_size is not None:
            batch = select_examples(batch, slice(0, self.max_physical_batch_size))
        engine = self._active_engine()
        engine.discard_per_example_state()
        with self._physical_step():
            yield batch
        engine.discard_per_example_state()

    def _views(self, batch: Any) -> Any:
        """``batch`` as ``training_step`` takes it: augmented views flattened into the examples' rows."""
        return flat_views(batch, self.augmentation_multiplicity)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        ordinary = super().backward  # type: ignore[misc]
        return self._agreed(
            lambda: self._active_engine().backward(
                closure_loss,
                lambda: ordinary(closure_loss, optimizer, *args, **kwargs),
                self._rows,
                self.precision_plugin,
            ),
            last=True,
            held=lambda: closure_loss,
        )

    def _agreed(self, run: Callable[[], Any], last: bool, held: Callable[[], Any]) -> Any:
        """``run()`` (a step's ``training_step`` or backward pass); under DDP, on a step whose checks run on some
        rank, every rank's verdict is agreed after it (:mod:`~lightning_nt.privacy.agreement`): a refusal found on
        one rank is raised on every rank, before anyone steps. The backward pass (``last``) decides whether the
        next step's checks are agreed too: while some rank still has its first-step checks to run. On the later
        steps, a refusal is held instead (:meth:`_held`), and ``held()`` stands for what ``run()`` would return."""
        if not self._agreeing:
            return run() if self._later is None else self._held(run, held)
        try:
            result = run()
        except Exception as failure:
            if raised_by_lightning_nt(failure):  # a refusal of the checks; the module's own errors end their rank
                agree_across_ranks(self, failure, pending=False)  # raises the lowest failing rank's error
            raise  # fail closed, should the agreement ever return
        pending = agree_across_ranks(self, None, pending=last and self._first_checks_pending())
        if last:
            self._agreeing = pending
        return result

    def _held(self, run: Callable[[], Any], held: Callable[[], Any]) -> Any:
        """``run()``, unless this rank already holds a refusal of this step; a refusal it raises is held, not raised
        (:class:`~lightning_nt.privacy.agreement.LaterRefusals`): the rank goes on to the step's all-reduce, whose
        update its NaN gradients make all-NaN on every rank, and every rank raises it at the next step's start. The
        module's own errors end their rank at once, as on the first steps."""
        refusals = self._later
        assert refusals is not None, "held only under DDP"
        if refusals.failure is None:
            try:
                result = run()
            except Exception as failure:
                if not refusals.hold(failure):
                    raise
            else:
                if refusals.failure is None:  # else held by a check during the run, which went on plainly
                    return result
        return held()

    def _check_later_refusals(self) -> None:
        """Under DDP: raise, on every rank, a refusal that some rank held through the last step (every rank calls
        this at the same points: a step's start, a checkpoint, the end of training)."""
        if self._later is not None:
            self._later.check(self)

    def _first_checks_pending(self) -> bool:
        """Whether this rank still has checks of a fit's first steps to run (a batch too small to check, or empty)."""
        return self._first_step or self._probe_pending or self._independence_tries > 0 or not self._uses_checked

    @contextlib.contextmanager
    def _physical_step(self) -> Iterator[None]:
        """Where a physical part's ``training_step`` runs: no DDP gradient sync, the precision plugin's context."""
        with self._without_ddp_gradient_sync(), self.precision_plugin.train_step_context():
            yield

    def _empty_step(self) -> torch.Tensor:
        """An empty Poisson batch is still a step: zero per-example gradients, so the update is the noise alone.

        The module's ``training_step`` is not called (its loss and metrics would be NaN or fail on 0 examples); the
        optimizer gives every parameter without a gradient a zero one (0 examples here).
        """
        return torch.zeros((), device=self.root_device, requires_grad=True)

    def _without_ddp_gradient_sync(self) -> Any:
        model = self.model
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    # -- the noisy step -------------------------------------------------------------------------------------

    @override
    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        try:
            return self._private_step(optimizer, closure, model, **kwargs)
        finally:
            self._stop_watching_parameter_uses()
            self._active_engine().stop()  # callbacks that differentiate the module must not meet its hooks
            self._active_engine().forget()
            self._warn_about_logging_from_the_batch()  # also what on_before_optimizer_step logged

    def _private_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        if not self._budget_exhausted():
            self._seed_noise(optimizer)
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]
        # Lightning insists that the closure runs; its results are discarded and nothing of it is logged.
        module = self.lightning_module
        with captured_logging(module), frozen_metrics(module):
            closure()
        if self._later is not None:  # no all-reduce carries a refusal held in this step: agreed here, once
            self._later.agree_now(self)
        optimizer.zero_grad()
        module.trainer.should_stop = True
        self._skipped_steps += 1
        rank_zero_warn(f"DP budget reached: one more step would exceed epsilon={self.target_epsilon}; stopping.")
        return None

    def _seed_noise(self, optimizer: Any) -> None:
        """Each step's noise comes from a generator of its own. By default (and always with ``secure_mode``) it is
        seeded from the OS, not from torch's global RNG: scripts seed that with a public number
        (``pl.seed_everything(42)``), from which anyone could regenerate the noise and subtract it. With ``seed=``
        (reproducible runs, warned) it comes from ``(seed, n)``, ``n`` the noisy steps already in the ledger: a resumed
        run adds the noise the uninterrupted run added, and no two steps of one ledger share their noise (a second
        ``fit`` restarts the Trainer's step count, not the ledger; two steps with the same noise would release the
        difference of their clipped sums without any)."""
        if self.seed is not None and not self.secure_mode:
            optimizer.generator = seeded_noise(self.seed, steps_taken(self.accountant), self.root_device)
        else:
            optimizer.generator = secret_noise(self.root_device)

    def _budget_exhausted(self) -> bool:
        if self.target_epsilon is None or not self.stop_at_budget:
            return False
        return exceeds_budget(
            self.accountant,
            self.accountant_name,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            target_epsilon=self.target_epsilon,
            delta=self.delta,
            plan=self._plan,
        )

    def _after_noise(self, optimizer: DPOptimizer) -> None:
        self.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)
        trainer = self.lightning_module.trainer
        if self.log_clip_fraction and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            log_clip_fraction(trainer, self._active_engine().last_norms(), self.max_grad_norm)

    @override
    def on_exception(self, exception: BaseException) -> None:
        # a step interrupted between its backward pass and its noise leaves raw gradients on the parameters
        self._stop_watching_parameter_uses()
        if self._engine is not None:
            self._engine.stop()
            self._engine.forget(gradients=True)
        super().on_exception(exception)  # type: ignore[misc]
