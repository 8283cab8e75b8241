import dataclasses
from collections import namedtuple

import pytest
import torch

from lightning_nt.common import ProbeSet, batch_size, concatenate_batches, select_examples, tensors_of


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor
    labels: torch.Tensor
    source: str = "digits"


Pair = namedtuple("Pair", ["inputs", "labels"])


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y: (x, y),
        lambda x, y: [x, y],
        lambda x, y: {"inputs": x, "labels": y},
        lambda x, y: Pair(x, y),
        lambda x, y: Batch(x, y),
        lambda x, y: {"nested": [Batch(x, y)], "scale": torch.tensor(2.0)},
    ],
    ids=["tuple", "list", "dict", "namedtuple", "dataclass", "nested"],
)
def test_every_batch_shape_lightning_moves_is_counted_sliced_and_cached(make):
    batches = [make(torch.randn(4, 3), torch.arange(4) + 4 * i) for i in range(3)]
    assert batch_size(batches[0]) == 4
    part = select_examples(batches[1], slice(1, 3))
    assert type(part) is type(batches[1]) and batch_size(part) == 2
    probe = ProbeSet.from_batches(batches, num_examples=10)
    whole, share = next(probe.chunks())
    assert type(whole) is type(batches[0]) and batch_size(whole) == 10 and share == 1.0
    labels = next(t for t in tensors_of(whole) if t.dtype == torch.long)
    assert torch.equal(labels, torch.arange(10))


def test_dataclass_batch_has_no_tensor_leaf_counted_as_one_example():
    # torch's pytree sees an unregistered dataclass as one leaf: a batch size of "no tensors"
    batch = Batch(torch.randn(5, 2), torch.arange(5))
    assert batch_size(batch) == 5
    assert select_examples(batch, torch.tensor([0, 4])).labels.tolist() == [0, 4]


def test_differing_non_tensor_fields_are_refused_not_dropped():
    with pytest.raises(TypeError, match="non-tensor fields differ"):
        concatenate_batches([Batch(torch.zeros(1, 2), torch.zeros(1), name) for name in "ab"])


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y, ids: {"inputs": x, "labels": y, "ids": list(ids), "meta": None},
        lambda x, y, ids: [x, y, tuple(ids)],  # what default_collate makes of (tensor, tensor, str) examples
    ],
    ids=["dict-with-list", "collated-tuple"],
)
def test_per_example_lists_of_plain_values_are_sliced_and_concatenated_with_the_tensors(make):
    # a list of string ids beside the tensors: one item per example, so it follows the examples
    batches = [make(torch.randn(4, 3), torch.arange(4) + 4 * i, [f"id{4 * i + j}" for j in range(4)]) for i in range(3)]
    probe = ProbeSet.from_batches(batches, num_examples=10)
    whole, _ = next(probe.chunks())
    ids = whole["ids"] if isinstance(whole, dict) else whole[2]
    assert list(ids) == [f"id{k}" for k in range(10)]
    assert type(ids) is type(batches[0]["ids"] if isinstance(whole, dict) else batches[0][2])
    part = select_examples(whole, torch.tensor([7, 2]))
    part_ids = part["ids"] if isinstance(part, dict) else part[2]
    assert list(part_ids) == ["id7", "id2"] and batch_size(part) == 2


def test_lists_that_are_not_one_item_per_example_are_kept_whole():
    batch = {"x": torch.zeros(4, 2), "classes": ["cat", "dog"], "pair": Pair(1, 2)}
    assert select_examples(batch, slice(0, 1))["classes"] == ["cat", "dog"]
    assert select_examples(batch, slice(0, 1))["pair"] == Pair(1, 2)
    assert concatenate_batches([batch, batch])["classes"] == ["cat", "dog"]


def test_batches_padded_to_different_lengths_are_refused_naming_the_fixes():
    """Found: dynamic padding (each batch padded to its own longest sequence) crashed the probe set with torch.cat's
    raw "Sizes of tensors must match" RuntimeError."""
    batches = [
        (torch.zeros(8, 11, dtype=torch.long), torch.zeros(8)),
        (torch.zeros(8, 9, dtype=torch.long), torch.ones(8)),
    ]
    message = r"per-example shapes \[\(9,\), \(11,\)\].*`num_examples` at most the batch size.*fixed length"
    with pytest.raises(ValueError, match=message):
        concatenate_batches(batches)
    with pytest.raises(ValueError, match=message):
        ProbeSet.from_batches(batches, num_examples=12)
    assert len(ProbeSet.from_batches(batches, num_examples=8)) == 8  # one batch's examples: nothing to concatenate
