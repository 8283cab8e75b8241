"""Per-example clipping (a DP-SGD stage) by book-keeping: one ordinary backward pass, no weight gradient twice.

``grad_sample_mode="bk"``: :class:`~lightning_nt.privacy.book_keeping.BookKeepingClipper` records each layer's
inputs and output gradients during the step's one backward pass, then forms the clipped sum per layer and leaves
it in ``.grad`` (Bu, Wang, Zha & Karypis, ICML 2023). ``training_step`` is unchanged (the mean loss).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_nt.common import loss_from_output
from lightning_nt.privacy.book_keeping import BookKeepingClipper
from lightning_nt.privacy.engines.base import ClippingEngine
from lightning_nt.privacy.engines.ghost import _GhostDistributedDPOptimizer, _GhostDPOptimizer

__all__ = ["BookKeepingEngine"]


class BookKeepingEngine(ClippingEngine):
    """The single-backward engine; refuses, before the first step, a module with a layer it can't clip."""

    optimizers = (_GhostDPOptimizer, _GhostDistributedDPOptimizer)  # the clipped sum arrives in .grad, as in ghost

    def __init__(self, mode: str, module: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        try:
            self.clipper = BookKeepingClipper(
                module, options["max_grad_norm"], loss_reduction="mean", group_size=options["views"]
            )
        except ValueError as error:
            raise RuntimeError(f"grad_sample_mode='bk' can't clip this module: {error}") from error
        super().__init__(mode, module, optimizer, **options)
        self.clipper.refuse = self.route

    def _start(self) -> None:
        self.clipper.start()

    def _stop(self) -> None:
        self.clipper.stop()

    def _close(self) -> None:
        self.clipper.stop()

    def backward(self, loss: torch.Tensor, ordinary: Callable[[], torch.Tensor], rows: int, precision: Any) -> Any:
        result = ordinary()
        self.clipper.stop()
        if rows:  # not an empty batch
            self._count_nonfinite(self.clipper.clip_and_sum(rows))
        return result

    def carry(self, rows: int) -> None:
        self.clipper.stop()
        self._count_nonfinite(self.clipper.clip_and_sum(rows, carry=True))
        self.clipper.start()

    def example_quantities(self, output: Any, rows: int) -> dict[str, torch.Tensor]:
        """Each example's gradient norm for every parameter (the norms the clip factors come from)."""
        loss_from_output(output, "training_step").backward()
        self.clipper.stop()
        try:
            norms = self.clipper.squared_norms(rows) if rows else {}
        finally:
            self.clipper.start()
        return {self.parameter_names[id(p)]: squared.detach().float().sqrt()[:, None] for p, squared in norms.items()}

    def discard_per_example_state(self) -> None:
        self.clipper.discard()

    def last_norms(self) -> torch.Tensor | None:
        return self.clipper.last_norms

    def _forget_own_state(self) -> None:
        self.clipper.discard()

    def _count_nonfinite(self, norms: torch.Tensor) -> None:
        """Examples whose gradient was not finite (they contributed zero): counted over the run, reported once."""
        optimizer = self.optimizer
        optimizer.nonfinite_examples = getattr(optimizer, "nonfinite_examples", 0) + (~norms.isfinite()).sum()
