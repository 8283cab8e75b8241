"""Per-example clipping (a DP-SGD stage) by Opacus's ghost clipping: two backward passes, no per-example gradient.

``grad_sample_mode="ghost"`` (Li et al.; Bu et al.): ``training_step`` returns the ``[B]`` per-example losses; the
first backward pass gives each example's gradient norm from Opacus's ghost-norm hooks, the second back-propagates
the losses weighted by their clip factors, which leaves the clipped sum in ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from opacus.optimizers import DistributedDPOptimizerFastGradientClipping, DPOptimizerFastGradientClipping

from lightning_nt.privacy.agreement import AgreedReduction
from lightning_nt.privacy.engines.hooks import OpacusHooksEngine, _GhostHooks
from lightning_nt.privacy.module_guards import refusing_recomputation

__all__ = ["GhostClippingEngine"]


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

    def accumulate(self) -> None:
        """Opacus's, without its copy: the clipped sum moves from ``.grad`` to ``summed_grad`` (Opacus deep-copies it,
        a slow Python copy per parameter and step), and ``.grad`` is left empty until the noise sets it, so a later
        backward pass can't add into the sum. A sum already there is added to in place, as Opacus does: the mark its
        noise step leaves on it then refuses a second step that was not cleared (a sum released twice)."""
        for p in self.params:  # type: ignore[attr-defined]
            p.summed_grad = p.grad if p.summed_grad is None else p.summed_grad.add_(p.grad)
            p.grad = None


class _GhostDPOptimizer(_ZeroForUnusedParameters, DPOptimizerFastGradientClipping):
    pass


class _GhostDistributedDPOptimizer(
    AgreedReduction, _ZeroForUnusedParameters, DistributedDPOptimizerFastGradientClipping
):
    pass


class GhostClippingEngine(OpacusHooksEngine):
    """Opacus's ghost clipping: norms from a first backward pass, the clipped sum from a second one."""

    supports_virtual_steps = False
    supports_sensitivity_probe = False
    hooks_class = _GhostHooks
    outside_uses_escape_clipping = True
    calls_each_layer_once = True
    releases_replayed_gradients = False  # the second backward pass releases them: norms from a re-run can't bound it
    outside_use = "the gradient of such a use would reach the update unclipped (the ghost norms miss it)"
    optimizers = (_GhostDPOptimizer, _GhostDistributedDPOptimizer)
    _losses: torch.Tensor | None = None  # this step's per-example losses, until its backward

    def _hook_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"loss_reduction": "mean", "max_grad_norm": options["max_grad_norm"]}

    @classmethod
    def check_precision(cls, precision: str) -> None:
        if precision != "32-true":
            raise RuntimeError(
                f"grad_sample_mode='ghost' with precision={precision!r}: Opacus computes the ghost norms in "
                "low precision, so a clipped gradient could exceed max_grad_norm. Use precision='32-true' or 'hooks'."
            )

    def take_output(self, output: Any) -> Any:
        """Keep the ``[B]`` losses for the two backward passes, hand Lightning their mean."""
        losses = output["loss"] if isinstance(output, dict) else output
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
            raise RuntimeError(
                "grad_sample_mode='ghost' needs training_step to return the per-example losses, a [B] tensor "
                "(e.g. F.cross_entropy(logits, y, reduction='none')), or a dict with them under 'loss'."
            )
        self._losses = losses
        return {**output, "loss": losses.mean()} if isinstance(output, dict) else losses.mean()

    def backward(self, loss: torch.Tensor, ordinary: Callable[[], torch.Tensor], rows: int, precision: Any) -> Any:
        losses = self._checked_losses(rows)
        if losses is None:  # an empty batch: no per-example losses, the update is the noise alone
            return ordinary()
        loss = precision.pre_backward(loss, self.module)
        self._norms_pass(losses, retain_graph=True)
        hooks = self.hooks
        factors = hooks.get_clipping_coef()
        if not bool(torch.isfinite(factors).all()):  # ghost clipping can't zero one example: stop before a release
            raise RuntimeError(
                "An example's gradient is not finite, and grad_sample_mode='ghost' can't leave it out of the clipped "
                "sum (a NaN loss poisons the second backward pass): training stops before this step is released. "
                "Use grad_sample_mode='hooks', which zeroes non-finite per-example gradients, or clean the data."
            )
        for p in hooks.trainable_parameters:  # a layer skipped next time must not reuse these norms
            if hasattr(p, "_norm_sample"):
                del p._norm_sample
        hooks.disable_hooks()
        (factors.to(losses.device) * losses).sum().backward()
        return precision.post_backward(loss, self.module)

    def _checked_losses(self, rows: int) -> torch.Tensor | None:
        """This step's per-example losses (None for an empty batch), once the layers' rows and their number agree."""
        losses, self._losses = self._losses, None
        layer_rows = self._check_rows(rows)
        if losses is not None and (len(losses) > rows or layer_rows not in (None, len(losses))):
            raise RuntimeError(
                f"training_step returned {len(losses)} losses for a batch of {rows} examples whose layers saw "
                f"{layer_rows} rows: grad_sample_mode='ghost' clips each loss's gradient as one example's, so it needs "
                "one loss per example (average an example's per-token losses into one, e.g. "
                "losses.view(len(batch), -1).mean(1))."
            )
        return losses

    def _norms_pass(self, losses: torch.Tensor, retain_graph: bool) -> None:
        """The first backward pass: every trainable parameter's per-example norms in ``_norm_sample``; a layer that
        activation checkpointing runs again in it is refused by name (Opacus would call it parameter tying)."""
        with refusing_recomputation(self.module):
            losses.mean().backward(retain_graph=retain_graph)
        self.optimizer.zero_grad()
        for p in self.hooks.trainable_parameters:  # unused in this forward: its per-example norms are zero
            if not hasattr(p, "_norm_sample"):
                p._norm_sample = torch.zeros(len(losses), device=p.device)

    def example_quantities(self, output: Any, rows: int) -> dict[str, torch.Tensor]:
        """Each example's gradient norm for every parameter (the ghost norms the clip factors come from), and its
        loss: the second pass weighs each loss by the factor of the row in its place, so they must be in step."""
        self.take_output(output)
        losses = self._checked_losses(rows)
        if losses is None:
            return {}
        self._norms_pass(losses, retain_graph=False)
        found = {"the order of the per-example losses training_step returns": losses.detach().float()[:, None]}
        for p in self.hooks.trainable_parameters:
            found[self.parameter_names[id(p)]] = p._norm_sample.detach().float()[:, None]
            del p._norm_sample
        return found

    def carry(self, rows: int) -> None:
        raise RuntimeError("grad_sample_mode='ghost' has no virtual steps (refused when the strategy is built).")

    def discard_per_example_state(self) -> None:
        self._losses = None

    def last_norms(self) -> torch.Tensor | None:
        return getattr(self.hooks, "per_sample_gradient_norms", None)

    def _forget_own_state(self) -> None:
        if hasattr(self.hooks, "_per_sample_gradient_norms"):
            self.hooks._per_sample_gradient_norms = None
        self._losses = None
        self._rows.seen = []
