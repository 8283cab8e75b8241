"""The example-independence check (a DP-SGD guard): every example's clipped quantity depends on that example alone.

Every clipping engine takes dimension 0 of each trainable layer's input as the examples. A layer that sees them
elsewhere (a sequence-first ``[T, B, d]`` layout: ``batch_first=False``, ``x.transpose(0, 1)``; a loop over
dimension 0 of a batch-first tensor) has rows that each sum a part of every example's gradient; the engine clips
each such row to ``max_grad_norm``, and one example can move the update by up to ``2 T C``. Row counts can't tell
(``T`` may be at most, or exactly, the batch), nor can shapes. So the property itself is tested, on a fit's first
batch of two distinct examples: the step's forward and backward passes run again on the batch, and on the batch
with its first, then its last example replaced by another example of the batch; each replacement may change what
the engine clips (per-example gradients under hooks, per-example norms under ghost and bk) for one unit at most,
the same unit in every layer, and the two replacements not for the same unit. Coupling written by hand
(``x - x.mean(0)`` in ``forward``; a loss averaged over all the batch's tokens, whose count depends on every
example) is refused by the same rule.

What it can't see: coupling that spares the first and the last example (a layer that mixes some middle examples
only) and coupling that appears on later batches only (data-dependent control flow). On a platform whose kernels
are not deterministic, a difference within ten times the run-to-run difference of the same batch is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_nt.common import batch_size, map_examples, preserved_state, tensors_of, training_step_output
from lightning_nt.privacy.engines import ClippingEngine
from lightning_nt.privacy.virtual_steps import refuse_skipped_step

__all__ = ["check_example_independence"]

Quantities = dict[str, Tensor]
_RELATIVE = 1e-5  # an unchanged unit's relative change (fp32 rounding of a reordered sum, well below)
_NOISE_MARGIN = 10.0  # a change counts if over this many times the run-to-run change of the same batch


def check_example_independence(
    module: pl.LightningModule,
    engine: ClippingEngine,
    batch: Any,
    batch_idx: int,
    prepare: Callable[[Any], Any] = lambda batch: batch,
) -> bool:
    """Refuse (before any noise) a module whose per-example quantities mix the examples of ``batch``.

    Returns False, checking nothing, when ``batch`` has no two distinct examples (the check waits for a later
    batch); True once checked. ``prepare`` turns a batch into what ``training_step`` takes (augmented views are
    flattened after an example was replaced, so that a whole example is). Logging, metrics, the module's state and
    the RNGs are as they were when it returns: the step that follows is the one that would have run without it.

    Example::

        check_example_independence(module, engine, batch, batch_idx)  # RuntimeError naming a mixing layer
    """
    size = batch_size(batch)
    replaced = [_with_example_replaced(batch, index) for index in (0, size - 1)] if size >= 2 else [None]
    if any(probe is None for probe in replaced):
        return False

    def quantities(probe: Any) -> Quantities:
        return _example_quantities(module, engine, prepare(probe), batch_idx)

    original = quantities(batch)
    changed = [quantities(probe) for probe in replaced]
    mixing = _mixing_layers(original, changed, None)
    if mixing:  # a platform whose kernels are not deterministic: not over its own run-to-run differences
        mixing = _mixing_layers(original, changed, _differences(original, quantities(batch)))
    if mixing:
        raise RuntimeError(
            f"A trainable layer mixes the examples of the batch ({', '.join(mixing)}): replacing one example changed "
            "what DP-SGD clips for other examples (their per-example gradients or norms). The clipping engines take "
            "dimension 0 of every trainable layer's input as the examples; a layer that sees them elsewhere (a "
            "sequence-first [T, B, d] input: batch_first=False, x.transpose(0, 1); a loop over dimension 0 of a "
            "[B, T, d] tensor) is clipped one row of all examples at a time, so one example could move the update "
            "by far more than max_grad_norm. Keep the examples in dimension 0 of every trainable layer's input "
            "(batch_first=True, or transpose back before the layer), and make every example's loss depend on that "
            "example alone: no x - x.mean(0) or other coupling across the batch, no mean over all the batch's "
            "tokens (F.cross_entropy(..., ignore_index=pad) over [B * T] positions divides by the count of every "
            "example's tokens): average each example's own tokens, then the examples."
        )
    return True


def _with_example_replaced(batch: Any, index: int) -> Any | None:
    """``batch`` with example ``index`` (all its tensors) replaced by the first example that differs from it; None if
    every example is the same."""
    differs = None
    for tensor in tensors_of(batch):
        if tensor.ndim:
            rows = (tensor != tensor[index : index + 1]).reshape(len(tensor), -1).any(dim=1)
            differs = rows if differs is None else differs | rows.to(differs.device)
    if differs is None or not bool(differs.any()):
        return None
    donor = int(differs.nonzero()[0])
    return map_examples(batch, lambda t: torch.cat([t[:index], t[donor : donor + 1], t[index + 1 :]]))


def _example_quantities(module: pl.LightningModule, engine: ClippingEngine, batch: Any, batch_idx: int) -> Quantities:
    """One forward and backward pass of ``training_step`` on ``batch``, with nothing of it left behind."""
    engine.discard_per_example_state()
    with preserved_state(module), torch.enable_grad():
        output = refuse_skipped_step(training_step_output(module, batch, batch_idx))
        return engine.example_quantities(output, batch_size(batch))


def _differences(first: Quantities, second: Quantities) -> Quantities:
    """Per parameter and unit, how far ``second`` is from ``first``."""
    return {
        name: (second[name] - first[name]).norm(dim=1)
        for name in first
        if name in second and second[name].shape == first[name].shape
    }


def _changed_units(original: Quantities, changed: Quantities, noise: Quantities | None) -> dict[str, set[int]]:
    """Per parameter, the units whose quantities changed (bitwise-equal ones, NaN included, did not)."""
    found: dict[str, set[int]] = {}
    for name, before in original.items():
        after = changed.get(name)
        if after is None or after.shape != before.shape:
            continue
        same = ((before == after) | (before.isnan() & after.isnan())).all(dim=1)
        tolerance = _RELATIVE * torch.maximum(before.norm(dim=1), after.norm(dim=1))
        if noise is not None and name in noise:
            tolerance = tolerance + _NOISE_MARGIN * noise[name]
        close = (after - before).norm(dim=1) <= tolerance
        found[name] = set((~(same | close)).nonzero().flatten().tolist())
    return found


def _mixing_layers(original: Quantities, changed: list[Quantities], noise: Quantities | None) -> list[str]:
    """The layers (named by their parameters) whose units show one example's replacement reaching other units."""
    units = [_changed_units(original, probe, noise) for probe in changed]
    mixing = {name for found in units for name, rows in found.items() if len(rows) > 1}
    first, last = units
    mixing |= {name for name, rows in first.items() if rows & last.get(name, set())}
    for found in units:  # each replacement: one unit, the same in every layer
        if len(set().union(*found.values())) > 1:
            mixing |= {name for name, rows in found.items() if rows}
    return list(dict.fromkeys(_layer(name) for name in original if name in mixing))


def _layer(parameter: str) -> str:
    """``"encoder.fc.weight"`` -> ``"encoder.fc"`` (a name without a dot, kept)."""
    return parameter.rpartition(".")[0] or parameter
