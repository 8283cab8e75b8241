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
are not deterministic, a difference within ten times the run-to-run difference of the same batch (per unit, the
largest of three reruns: one can come out small by chance) is not counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_nt.common import (
    batch_size,
    copied,
    frozen_attributes,
    map_examples,
    preserved_state,
    tensors_of,
    training_step_output,
)
from lightning_nt.privacy.engines import ClippingEngine
from lightning_nt.privacy.virtual_steps import refuse_skipped_step

__all__ = ["check_example_independence"]

Quantities = dict[str, Tensor]
_RELATIVE = 1e-5  # an unchanged unit's relative change (fp32 rounding of a reordered sum, well below)
_NOISE_MARGIN = 10.0  # a change counts if over this many times the run-to-run change of the same batch
_TRIES = 6  # (example, donor) pairs tried from each end of the batch for a replacement that can be compared
_NOISE_SAMPLES = 3  # run-to-run differences drawn (on a platform whose kernels are not deterministic only)
_REPEATABLE = 1e-3  # a run-to-run change of the same batch above this (relative) is not the kernels' rounding


def check_example_independence(
    module: pl.LightningModule,
    engine: ClippingEngine,
    batch: Any,
    batch_idx: int,
    prepare: Callable[[Any], Any] = lambda batch: batch,
) -> bool:
    """Refuse (before any noise) a module whose per-example quantities mix the examples of ``batch``.

    Returns False, checking nothing, when ``batch`` has no two distinct examples (the check waits for a later batch);
    True once checked. An example left out by ``training_step`` changes the shapes of what is clipped when it is
    replaced or replaces another: other examples and donors are tried, up to ``_TRIES`` pairs from each end of the
    batch. ``prepare`` turns a batch into what ``training_step`` takes (augmented views are flattened after an example
    was replaced, so that a whole example is). ``training_step`` runs three or four more times (more when examples
    are left out), each on a copy of the batch; logging, metrics, the module's tensors and the RNGs are as they were
    when it returns, so the step that follows is the one that would have run without it, except for state the module
    keeps in Python (a call counter), which advances.

    Example::

        check_example_independence(module, engine, batch, batch_idx)  # RuntimeError naming a mixing layer
    """
    size = batch_size(batch)
    if size < 2 or not _donors(batch, 0):
        return False

    def quantities(probe: Any) -> Quantities:
        return _example_quantities(module, engine, prepare(probe), batch_idx)

    original = quantities(batch)
    changed = [_comparable_replacement(batch, ends, original, quantities) for ends in (_from_the_start, _from_the_end)]
    mixing = _mixing_layers(original, changed, None)
    if mixing:  # a platform whose kernels are not deterministic: not over its own run-to-run differences
        noise = _larger(*(_differences(original, quantities(batch)) for _ in range(_NOISE_SAMPLES)))
        _refuse_unrepeatable(original, noise)
        mixing = _mixing_layers(original, changed, noise)
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


def _comparable_replacement(
    batch: Any, positions: Callable[[int], list[int]], original: Quantities, quantities: Callable[[Any], Quantities]
) -> Quantities:
    """The quantities of ``batch`` with one example replaced: the first (example, donor) pair, examples taken from
    ``positions`` and each with its first two donors, whose replacement leaves some quantity's shape as in
    ``original`` (a step that leaves examples out changes the shapes when the replaced or the donor example is one it
    leaves out); at most ``_TRIES`` pairs, then refused."""
    pairs = [(index, donor) for index in positions(batch_size(batch)) for donor in _donors(batch, index)[:2]]
    for index, donor in pairs[:_TRIES]:
        changed = quantities(_with_example_replaced(batch, index, donor))
        if _comparable(original, changed):
            return changed
    raise RuntimeError(
        f"DP-SGD's example-independence check replaced {min(len(pairs), _TRIES)} examples of the batch in turn, and "
        "every replacement changed the shape of what is clipped (training_step left the replaced or the replacing "
        "example out), so it could not compare the examples and can't show that no layer mixes them. Keep every "
        "example of a batch in the loss (weight it by 0 instead of leaving it out)."
    )


def _from_the_start(size: int) -> list[int]:
    return list(range(size // 2))


def _from_the_end(size: int) -> list[int]:
    return list(range(size - 1, size // 2 - 1, -1))


def _donors(batch: Any, index: int) -> list[int]:
    """The examples of ``batch`` that differ from example ``index`` (NaN equal to NaN), in order."""
    differs = None
    for tensor in tensors_of(batch):
        if tensor.ndim:
            other = tensor[index : index + 1]
            unequal = tensor != other
            if tensor.is_floating_point():  # NaN == NaN here: an example is never its own donor
                unequal &= ~(tensor.isnan() & other.isnan())
            rows = unequal.reshape(len(tensor), -1).any(dim=1)
            differs = rows if differs is None else differs | rows.to(differs.device)
    return [] if differs is None else differs.nonzero().flatten().tolist()


def _with_example_replaced(batch: Any, index: int, donor: int) -> Any:
    """``batch`` with example ``index`` (all its tensors) replaced by example ``donor``."""
    return map_examples(batch, lambda t: torch.cat([t[:index], t[donor : donor + 1], t[index + 1 :]]))


def _example_quantities(module: pl.LightningModule, engine: ClippingEngine, batch: Any, batch_idx: int) -> Quantities:
    """One forward and backward pass of ``training_step`` on a copy of ``batch``, with nothing of it left behind."""
    engine.discard_per_example_state()
    batch = copied(batch)  # a step that changes its batch in place changes a copy
    with preserved_state(module), frozen_attributes(module), torch.enable_grad():  # attributes kept to the backward
        output = refuse_skipped_step(training_step_output(module, batch, batch_idx))
        return engine.example_quantities(output, batch_size(batch))


def _comparable(first: Quantities, second: Quantities) -> bool:
    """Some parameter's quantities have the same shape in both (the same units to compare)."""
    return any(name in second and second[name].shape == value.shape for name, value in first.items())


def _refuse_unrepeatable(original: Quantities, noise: Quantities) -> None:
    """Refuse a step whose quantities on the same batch, run twice, differ by more than rounding could: then no
    margin over that difference tells mixing apart from it."""
    relative = [noise[name] / original[name].norm(dim=1).clamp_min(1e-30) for name in noise if len(noise[name])]
    worst = max((float(change.max()) for change in relative), default=0.0)
    if worst > _REPEATABLE:
        raise RuntimeError(
            f"training_step gave per-example quantities that differ by up to {worst:.2g} (relative) when run twice on "
            "the same batch with the same weights and random state, so DP-SGD's example-independence check can't "
            "tell whether a layer mixes the examples. Make training_step repeatable on a batch: no state kept in "
            "Python that changes its result from call to call (a call counter, a schedule advanced in the step)."
        )


def _larger(*differences: Quantities) -> Quantities:
    """Per parameter and unit, the largest of several run-to-run differences: one draw of a difference can come out
    small by chance, and a replacement's change within the margin over it would be taken for mixing."""
    return {name: torch.stack([found[name] for found in differences]).amax(dim=0) for name in differences[0]}


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
