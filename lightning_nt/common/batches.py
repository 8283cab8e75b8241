"""Batch plumbing: count, slice, map and concatenate the examples of any batch Lightning accepts.

A batch is whatever the user's dataloader yields: a tensor, tuples, lists, dicts, namedtuples or
dataclasses of them, nested. Lightning moves such batches with ``apply_to_collection``; everything here
walks them the same way, so a batch Lightning can train on is a batch every capability can measure on.
The examples are the rows (dimension 0) of the batch's tensors of one or more dimensions.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection, is_namedtuple
from torch import Tensor

__all__ = [
    "batch_size",
    "concatenate_batches",
    "copied",
    "map_examples",
    "select_examples",
    "tensors_of",
    "with_tensors",
]


def tensors_of(batch: Any) -> list[Tensor]:
    """Every tensor of ``batch`` in a fixed traversal order (the order ``apply_to_collection`` visits them)."""
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, found.append)
    return found


def with_tensors(template: Any, tensors: Sequence[Tensor]) -> Any:
    """``template``'s structure holding ``tensors`` (in :func:`tensors_of` order).

    A checkpoint stores a batch as its tensors (``torch.load(weights_only=True)`` refuses namedtuples and
    dataclasses); this rebuilds it from any batch of the same loader.

    Examples:
        >>> with_tensors({"x": torch.zeros(1), "y": [torch.zeros(1)]}, [torch.ones(2), torch.full((2,), 2.0)])
        {'x': tensor([1., 1.]), 'y': [tensor([2., 2.])]}
    """
    remaining = iter(tensors)
    return apply_to_collection(template, Tensor, lambda _: next(remaining))


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the common first dimension of all its tensors.

    Examples:
        >>> batch_size({"x": torch.zeros(5, 3), "y": torch.zeros(5), "scale": torch.tensor(2.0)})
        5
    """
    sizes = {tensor.shape[0] for tensor in tensors_of(batch) if tensor.ndim > 0}
    if len(sizes) != 1:
        raise ValueError(
            "Can't tell the number of examples in the batch: its tensors should share their first dimension, "
            f"found sizes {sorted(sizes)} in a {type(batch).__name__}."
        )
    return sizes.pop()


def copied(batch: Any) -> Any:
    """``batch`` with every tensor cloned: for a ``training_step`` run outside the real step, which may change its
    batch in place (``x.div_(255)``, masking ``ids[mask] = MASK``) and must not change the real step's.

    Examples:
        >>> batch = {"x": torch.zeros(2)}
        >>> copied(batch)["x"].add_(1) is batch["x"], batch["x"]
        (False, tensor([0., 0.]))
    """
    return apply_to_collection(batch, Tensor, torch.clone)


def map_examples(batch: Any, function: Callable[[Tensor], Tensor]) -> Any:
    """``batch`` with ``function`` applied to every tensor that has an example dimension (scalars kept)."""
    return apply_to_collection(batch, Tensor, lambda tensor: function(tensor) if tensor.ndim > 0 else tensor)


def select_examples(batch: Any, index: slice | Tensor) -> Any:
    """The examples ``index`` (a slice or an index tensor) of ``batch``, with the same structure.

    Examples:
        >>> select_examples((torch.arange(6), [torch.arange(6) * 10]), slice(2, 4))
        (tensor([2, 3]), [tensor([20, 30])])
        >>> select_examples({"x": torch.arange(3), "id": ["a", "b", "c"]}, torch.tensor([2, 0]))
        {'x': tensor([2, 0]), 'id': ['c', 'a']}
    """
    rows = index if isinstance(index, slice) else index.tolist()
    selected = _with_columns(batch, lambda column: _select(column, rows))
    return map_examples(selected, lambda tensor: tensor[index])


def concatenate_batches(batches: Sequence[Any]) -> Any:
    """One batch from several of the same structure: tensors concatenated along dim 0 (on the CPU if they differ).

    Fields that are not tensors must be equal in every batch (they are kept once).

    Examples:
        >>> concatenate_batches([{"x": torch.zeros(2, 3), "id": "a"}, {"x": torch.ones(1, 3), "id": "a"}])["x"].shape
        torch.Size([3, 3])
    """
    skeletons = [apply_to_collection(_with_columns(batch, _placeholder), Tensor, _placeholder) for batch in batches]
    if any(skeleton != skeletons[0] for skeleton in skeletons[1:]):
        raise TypeError(
            f"Batches of type {type(batches[0]).__name__} whose non-tensor fields differ can't be concatenated; "
            "make those fields tensors (their first dimension the batch), lists with one item per example, or "
            "leave them equal in every batch."
        )
    joined = iter([type(parts[0])(itertools.chain(*parts)) for parts in zip(*map(_columns_of, batches))])
    with_joined_columns = _with_columns(batches[0], lambda _: next(joined))
    columns = iter([_concatenate(column) for column in zip(*(tensors_of(batch) for batch in batches))])
    return apply_to_collection(with_joined_columns, Tensor, lambda _: next(columns))


def _placeholder(value: Tensor | list[Any] | tuple[Any, ...]) -> tuple[str, Any]:
    return ("tensor", value.ndim) if isinstance(value, Tensor) else ("column", type(value))


_PLAIN = (str, bytes, int, float, complex, type(None))


def _with_columns(batch: Any, replace: Callable[[list[Any] | tuple[Any, ...]], Any]) -> Any:
    """``batch`` with ``replace(column)`` for each column: a list or tuple of plain values, one per example."""
    examples: list[int | None] = []

    def visit(sequence: list[Any] | tuple[Any, ...]) -> Any:
        if sequence and not is_namedtuple(sequence) and all(isinstance(item, _PLAIN) for item in sequence):
            if not examples:
                examples.append(_examples_or_none(batch))
            return replace(sequence) if len(sequence) == examples[0] else sequence
        items = [apply_to_collection(item, (list, tuple), visit) for item in sequence]
        return type(sequence)(*items) if is_namedtuple(sequence) else type(sequence)(items)

    return apply_to_collection(batch, (list, tuple), visit)


def _columns_of(batch: Any) -> list[list[Any] | tuple[Any, ...]]:
    found: list[list[Any] | tuple[Any, ...]] = []
    _with_columns(batch, found.append)
    return found


def _examples_or_none(batch: Any) -> int | None:
    try:
        return batch_size(batch)
    except ValueError:  # no tensors with an example dimension: no columns either
        return None


def _select(column: list[Any] | tuple[Any, ...], rows: slice | list[int]) -> list[Any] | tuple[Any, ...]:
    return column[rows] if isinstance(rows, slice) else type(column)(column[row] for row in rows)


def _concatenate(column: tuple[Tensor, ...]) -> Tensor:
    if column[0].ndim == 0:
        if any(not torch.equal(tensor.cpu(), column[0].cpu()) for tensor in column[1:]):
            raise TypeError(
                "A scalar tensor field differs between batches, so the batches can't be concatenated; "
                "give it a batch dimension, or leave it equal in every batch."
            )
        return column[0].detach()
    shapes = sorted({tuple(tensor.shape[1:]) for tensor in column})
    if len(shapes) > 1:
        raise ValueError(
            f"A tensor field has per-example shapes {shapes} in different batches (as a collate that pads each "
            "batch to its own longest sequence gives), so the batches can't be concatenated into one probe set. "
            "Take the examples from one batch (`num_examples` at most the batch size), or pad to a fixed length "
            "in the collate function."
        )
    on_one_device = len({tensor.device for tensor in column}) == 1
    return torch.cat([tensor.detach() if on_one_device else tensor.detach().cpu() for tensor in column])
