"""Per-example clipping (a DP-SGD stage): the interface every clipping engine implements.

An engine forms, for each physical batch, the sum over examples of their gradients clipped to ``max_grad_norm``,
and owns the Opacus ``DPOptimizer`` that adds the noise to that sum. The strategy only calls the methods below
(attach and wrap in the constructor, :meth:`~ClippingEngine.start` / :meth:`~ClippingEngine.stop` around a
training step, :meth:`~ClippingEngine.backward`, :meth:`~ClippingEngine.carry` for virtual steps,
:meth:`~ClippingEngine.forget` after every step, :meth:`~ClippingEngine.example_quantities` for the
example-independence check of a fit's first batch), so it never asks which engine it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from lightning_nt.privacy.agreement import RefusalRoute
from lightning_nt.privacy.engines.replay import RECORDED_CALLS, SNAPSHOTS
from lightning_nt.privacy.engines.uses import WeightedBagGuard

__all__ = ["ClippingEngine"]

# what Opacus leaves on a parameter, and on a layer (with the re-run layers' recorded calls), from a private batch
_PER_EXAMPLE_ATTRIBUTES = ("grad_sample", "summed_grad", "_current_grad_sample", "_norm_sample")
_LAYER_ATTRIBUTES = ("activations", "max_batch_len", RECORDED_CALLS, SNAPSHOTS)


class ClippingEngine(ABC):
    """Clips every example's gradient of ``module`` and sums them; ``optimizer`` (the wrapped one) adds the noise.

    Args:
        mode: the ``grad_sample_mode`` that chose this engine.
        module: the LightningModule; its hooks (if any) are attached here, off until :meth:`start`.
        optimizer: the user's optimizer, wrapped in the engine's ``DPOptimizer`` subclass (:attr:`optimizer`).
        max_grad_norm: the clipping bound ``C``.
        noise_multiplier: noise std over ``C`` (the strategy resets it once the noise is calibrated).
        secure_mode: Opacus's secure noise.
        views: augmented views per example, whose gradients are averaged before clipping.
        distributed: wrap in Opacus's distributed optimizer (the noisy sum is all-reduced across processes).

    Example::

        engine = clipping_engine("hooks", module, optimizer, max_grad_norm=1.0, noise_multiplier=1.0,
                                 secure_mode=False, views=1, distributed=False)
        engine.start()                        # a training step: forward, then
        engine.backward(loss, loss.backward, rows=len(x), precision=trainer.precision_plugin)
        engine.optimizer.step()               # clipped sum + noise
        engine.stop(); engine.forget()        # nothing un-noised stays behind
    """

    supports_virtual_steps: ClassVar[bool] = True  # max_physical_batch_size and augmentation_multiplicity
    supports_sensitivity_probe: ClassVar[bool] = False  # needs the per-example gradients themselves
    outside_uses_escape_clipping: ClassVar[bool] = False  # a parameter used outside its layer: unclipped, or dropped
    outside_use: ClassVar[str] = "that part of its gradient would be silently left out of every update"
    optimizers: ClassVar[tuple[type[DPOptimizer], type[DPOptimizer]]]  # takes the clipped sums: (one, many processes)

    def __init__(
        self,
        mode: str,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        secure_mode: bool,
        views: int,
        distributed: bool,
    ) -> None:
        self.mode, self.module = mode, module
        self._trainable = _trainable_names(module)
        self.holds: Callable[[Exception], bool] | None = None  # set by the strategy where refusals are held
        self.recording = False  # between start and stop (stopped early where a refusal is held: see refuse)
        self.route = RefusalRoute()  # what the layers' hooks hold to refuse (not the engine: see RefusalRoute)
        self.route.to = self.refuse
        self._weighted_bags = WeightedBagGuard(module, self.trainable_ids, self.route)  # weights may come late
        self.parameter_names = {id(p): name for name, p in module.named_parameters()}  # to name them in results
        self.optimizer = self.optimizers[1 if distributed else 0](
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=1,  # set from the sample rate once the train loader is known
            loss_reduction="mean",
            secure_mode=secure_mode,
        )
        self.optimizer.views = views

    @classmethod
    def check_options(cls, mode: str, *, virtual_steps: bool, views: int, sensitivity_probe: bool) -> None:
        """Refuse, at construction, strategy options this engine can't honour."""
        if (virtual_steps or views != 1) and not cls.supports_virtual_steps:
            raise ValueError(
                f"`grad_sample_mode={mode!r}` can't be combined with `max_physical_batch_size` or "
                "`augmentation_multiplicity`: use 'hooks' for those."
            )
        if sensitivity_probe and not cls.supports_sensitivity_probe:
            raise ValueError("`sensitivity_probe=True` needs per-example gradients: use grad_sample_mode='hooks'.")

    @classmethod
    def check_precision(cls, precision: str) -> None:
        """Refuse, before the first step, a Trainer precision under which a clipped gradient could exceed ``C``.

        Every engine computes its norms and clip factors in fp32, except where an override says otherwise.
        """
        return

    def start(self) -> None:
        """Begin recording a training step (hooks on; an ``EmbeddingBag`` with ``per_sample_weights`` refused)."""
        self._start()
        self._weighted_bags.watching = self.recording = True

    def stop(self) -> None:
        """Stop recording (hooks off): other code may differentiate the module now."""
        self._weighted_bags.watching = self.recording = False
        self._stop()

    def refuse(self, refusal: Exception) -> None:
        """A check's ``refusal`` met during a recorded step (a forward hook's, or before the forward pass): raised;
        or, where the strategy holds refusals (:attr:`holds`: under DDP, after the first steps,
        :class:`~lightning_nt.privacy.agreement.LaterRefusals`), held, and the recording stopped, so that the step's
        forward pass goes on plainly and the module's own collectives in ``training_step`` (``self.log(...,
        sync_dist=True)``) still meet the other ranks'. Nothing of a held step is released (its update is NaN)."""
        if self.holds is None or not self.holds(refusal):
            raise refusal
        self.stop()

    def close(self) -> None:
        """Detach from the module for good (end of fit)."""
        self._weighted_bags.remove()
        self._close()

    @abstractmethod
    def _start(self) -> None:
        """The engine's own hooks on."""

    @abstractmethod
    def _stop(self) -> None:
        """The engine's own hooks off."""

    @abstractmethod
    def _close(self) -> None:
        """The engine's own hooks off the module for good."""

    def check_parameter_uses(self, outside: list[str]) -> None:
        """Refuse a step whose loss used parameters outside their layers' calls (:class:`~.uses.ParameterUses`,
        checked on a fit's first step, or every step where they would escape the clipping): every engine forms
        each example's gradient from the layers' calls, so the gradient of such a use is :attr:`outside_use`."""
        if outside:
            raise RuntimeError(
                f"grad_sample_mode={self.mode!r}: {', '.join(outside)} used outside a call of its own layer (e.g. "
                "F.linear(x, self.fc.weight) or `h @ embedding.weight.T` for a tied output layer, layer.forward(x) "
                "called directly, a penalty on the weights or a parameter of the LightningModule itself in "
                f"training_step). Per-example gradients are formed from the layers' calls, so {self.outside_use}. "
                "Call the layer itself (layer(x)) for every use of its parameters: tie weights by sharing the "
                "Parameter between two modules (e.g. an nn.Linear whose weight is the embedding's), and use the "
                "optimizer's weight_decay instead of a penalty in the loss."
            )

    @property
    def trainable_ids(self) -> set[int]:
        """Identities of the parameters this engine clips (those that required grad when it attached)."""
        return set(self._trainable.values())

    def take_output(self, output: Any) -> Any:
        """What Lightning gets from ``training_step``'s ``output`` (the same, except for ghost clipping)."""
        return output

    @abstractmethod
    def backward(self, loss: torch.Tensor, ordinary: Callable[[], torch.Tensor], rows: int, precision: Any) -> Any:
        """Back-propagate the step's last physical batch of ``rows`` rows and leave its clipped sum to the optimizer.

        ``ordinary`` runs Lightning's own backward of ``loss``; ``precision`` is the strategy's precision plugin.
        """

    @abstractmethod
    def example_quantities(self, output: Any, rows: int) -> dict[str, torch.Tensor]:
        """Back-propagate a probe's ``training_step`` ``output`` on ``rows`` rows; return, per trainable parameter
        name, what this engine clips per privacy unit, ``[units, k]`` in fp32 (nothing of it stays behind).

        The example-independence check (:mod:`~lightning_nt.privacy.independence`) compares them across batches
        that differ in one example. The engine's own row checks run first, with their own messages.
        """

    @abstractmethod
    def carry(self, rows: int) -> None:
        """Clip and sum the physical batch of ``rows`` rows just back-propagated; keep the sum for the step."""

    def check_trainable_parameters(self) -> None:
        """Refuse a step after the set of trainable parameters changed since the engine was attached.

        Every engine fixes, when it attaches, which parameters it clips: one unfrozen later would reach the noisy
        step with its ordinary, unclipped gradient (book-keeping, ghost) or silently not train (hooks).
        """
        now = _trainable_names(self.module)
        if now != self._trainable:
            changed = sorted(set(now) ^ set(self._trainable))
            raise RuntimeError(
                f"The trainable parameters changed during a private fit ({', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''} became {'trainable' if changed[0] in now else 'frozen'}): "
                "the DP engine clips the parameters that required grad when the fit started, and one unfrozen later "
                "would be released unclipped. Freeze or unfreeze before `fit` (e.g. one `fit` per stage of a "
                "fine-tuning schedule)."
            )

    @abstractmethod
    def discard_per_example_state(self) -> None:
        """Drop per-example gradients and carried sums before a logical batch starts."""

    @abstractmethod
    def last_norms(self) -> torch.Tensor | None:
        """Each example's gradient norm before clipping, in the last step (``None`` if not known)."""

    def forget(self, gradients: bool = False) -> None:
        """Drop everything derived from the private batch without noise (with ``gradients``, also ``.grad``).

        Opacus leaves the clipped sum (``summed_grad``), per-example gradients and norms on the parameters and the
        layers' inputs (``activations``) on the modules; they would travel with ``torch.save(module)``. A parameter
        that requires grad but is not in the optimizer gets no noise: its ``.grad`` (the ordinary or the clipped
        sum, un-noised) is dropped too.
        """
        noised = {id(p) for p in self.optimizer.params}
        for p in self.module.parameters():
            for name in _PER_EXAMPLE_ATTRIBUTES:
                if name in vars(p):
                    delattr(p, name)
            if gradients or id(p) not in noised:
                p.grad = None
        for submodule in self.module.modules():
            for name in _LAYER_ATTRIBUTES:
                if name in vars(submodule):
                    delattr(submodule, name)
        self._forget_own_state()

    @abstractmethod
    def _forget_own_state(self) -> None:
        """What the engine itself keeps from the private batch (norms, carried sums, losses)."""

    def take_nonfinite_count(self) -> int:
        """Examples whose gradient was not finite (they contributed zero) since the last call; the count is reset.

        The count is kept on the optimizer without a sync (a device tensor) and read once, at the end of the run.
        """
        count = int(getattr(self.optimizer, "nonfinite_examples", 0))
        self.optimizer.nonfinite_examples = 0  # released once, by the caller, and kept nowhere
        return count


def _trainable_names(module: nn.Module) -> dict[str, int]:
    """Name -> identity of every parameter of ``module`` that requires grad."""
    return {name: id(p) for name, p in module.named_parameters() if p.requires_grad}
