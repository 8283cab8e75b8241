"""Physical batches (a DP-SGD stage): one logical Poisson batch, run as parts that fit in memory.

With ``max_physical_batch_size`` the strategy runs every part but the last through ``training_step`` and a
backward pass itself, has the clipping engine clip and sum it (``ClippingEngine.carry``), and hands the last
part to Lightning's own step, after which the one noisy update follows. Augmented views
(``[B, K, ...]``) are flattened to ``B x K`` rows here, after the batch was cut, so an example's views stay together.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import pytorch_lightning as pl

from lightning_nt.common import batch_size, captured_logging, loss_from_output, map_examples, select_examples
from lightning_nt.privacy.engines import ClippingEngine

__all__ = ["flat_views", "refuse_skipped_step", "run_earlier_parts"]


def flat_views(batch: Any, views: int) -> Any:
    """``[B, K, ...]`` -> ``[B * K, ...]`` for every tensor of a batch of ``K`` augmented views (``K=1``: as is)."""
    if views == 1:
        return batch
    return map_examples(batch, lambda t: t.flatten(0, 1) if t.ndim >= 2 else t)


def run_earlier_parts(
    module: pl.LightningModule,
    engine: ClippingEngine,
    batch: Any,
    batch_idx: int,
    limit: int,
    views: int,
    context: Callable[[], AbstractContextManager[Any]],
) -> Any:
    """Clip-and-sum every physical part of ``batch`` but the last, and return the last.

    Each part's ``training_step`` runs inside ``context()`` (no DDP gradient sync, the precision plugin's
    autocast) with its logging captured: only the last part logs, as processes may run different numbers of parts.
    """
    size = batch_size(batch)
    starts = list(range(0, size, limit))
    engine.discard_per_example_state()  # Lightning zeroes them only after training_step
    module.zero_grad()  # and the gradients: the last step's noisy ones would be taken for the first part's
    for start in starts[:-1]:
        part = flat_views(select_examples(batch, slice(start, start + limit)), views)
        with context(), captured_logging(module):
            output = refuse_skipped_step(module.training_step(part, batch_idx))
        loss_from_output(output, "training_step").backward()
        if engine.recording:  # else a refusal is held (ClippingEngine.refuse): the parts go on plainly, unclipped
            engine.carry(batch_size(part))
    return select_examples(batch, slice(starts[-1], size))


def refuse_skipped_step(output: Any) -> Any:
    """Refuse a ``None`` from ``training_step``: under DP, whether a step happens must not depend on the batch."""
    if output is None or (isinstance(output, dict) and output.get("loss") is None):
        raise RuntimeError(
            "training_step returned None under DP-SGD. Skipping a step because of what is in the batch releases, "
            "without noise, whether the batch held such examples (and the step would go unaccounted). Return a "
            "loss for every batch: empty batches are handled by the strategy, and examples with a non-finite "
            "gradient contribute zero."
        )
    return output
