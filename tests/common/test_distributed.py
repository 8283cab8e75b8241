"""Cross-rank reductions: identity with one process, the right collectives (and device) with several."""

import math
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lightning_nt.common import (
    broadcast_from_rank_zero,
    gather_across_ranks,
    mean_across_ranks,
    min_across_ranks,
    sum_across_ranks,
)
from tests.helpers import BoringModel, rank_states, save_rank_state, tiny_trainer


def test_one_process_gets_every_value_back_unchanged():
    trainer = tiny_trainer(None)
    tensor, tensors, values = torch.arange(3.0), [torch.ones(2), torch.zeros(1)], {"a": 1.5, "b": -2.0}
    for reduce in (sum_across_ranks, mean_across_ranks):
        assert reduce(trainer, tensor) is tensor
        assert reduce(trainer, tensors) is tensors
        assert reduce(trainer, values) is values
        assert reduce(trainer, 0.25) == 0.25
    assert gather_across_ranks(trainer, tensor) is tensor
    assert min_across_ranks(trainer, 7) == 7
    assert broadcast_from_rank_zero(trainer, "seed") == "seed"


class RecordingStrategy:
    """Two ranks seen from rank 0: records what each collective received and answers with ones on the CPU."""

    def __init__(self, root_device: torch.device) -> None:
        self.root_device, self.received = root_device, []

    def reduce(self, tensor, reduce_op):
        self.received.append((tensor.device, tensor.dtype))
        return torch.ones(tensor.shape, dtype=tensor.dtype)

    def all_gather(self, tensor):
        self.received.append((tensor.device, tensor.dtype))
        return torch.ones((2, *tensor.shape), dtype=tensor.dtype)


def _two_ranks(device: str = "meta") -> SimpleNamespace:
    return SimpleNamespace(world_size=2, strategy=RecordingStrategy(torch.device(device)))


def test_python_numbers_travel_as_float64_or_int64_tensors_on_the_root_device():
    """What NCCL needs: a CUDA tensor; "meta" stands for any device other than the CPU."""
    trainer = _two_ranks()
    assert sum_across_ranks(trainer, 1.5) == 1.0
    assert mean_across_ranks(trainer, {"a": 1.5, "b": 2.5}) == {"a": 1.0, "b": 1.0}
    assert min_across_ranks(trainer, 4) == 1
    meta = torch.device("meta")
    assert trainer.strategy.received == [(meta, torch.float64), (meta, torch.float64), (meta, torch.int64)]


def test_numbers_come_back_as_the_kind_that_went_in():
    trainer = _two_ranks("cpu")
    assert type(sum_across_ranks(trainer, 3)) is float
    assert type(min_across_ranks(trainer, 3)) is int
    assert type(min_across_ranks(trainer, 3.5)) is float
    reduced = sum_across_ranks(trainer, [torch.zeros(2), torch.zeros(1)])
    assert isinstance(reduced, list) and [t.tolist() for t in reduced] == [[1.0, 1.0], [1.0]]


@pytest.mark.parametrize("value", ["1.0", None, {1.0, 2.0}])
def test_a_value_of_another_kind_is_refused_by_name(value):
    with pytest.raises(TypeError, match=r"Can't reduce a \w+ across ranks: pass a Tensor"):
        sum_across_ranks(_two_ranks("cpu"), value)


class Collect(pl.Callback):
    """Runs every reduction on rank-dependent values and saves the results for the test process."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        index = trainer.global_rank
        rank = float(index)
        results = {
            "sum_tensor": sum_across_ranks(trainer, torch.tensor([rank + 1, 10 * (rank + 1)])),
            "mean_tensor": mean_across_ranks(trainer, torch.tensor([rank, 4 * rank])),
            "sum_list": sum_across_ranks(trainer, [torch.full((2,), rank), torch.tensor(rank + 1)]),
            "sum_float": sum_across_ranks(trainer, rank + 0.5),
            "mean_float": mean_across_ranks(trainer, rank + 1),
            "mean_dict": mean_across_ranks(trainer, {"a": rank, "b": 2 * rank + 1}),
            "gather": gather_across_ranks(trainer, torch.full((2, 3), rank)),
            "min": min_across_ranks(trainer, 5 + index),
            "broadcast": broadcast_from_rank_zero(trainer, (2**61 + index, f"rank {index}")),
        }
        save_rank_state(trainer, self.directory, results)


@pytest.mark.ddp
def test_two_processes_sum_average_gather_and_broadcast(tmp_path):
    trainer = tiny_trainer(None, strategy="ddp_fork", devices=2, max_steps=1, callbacks=[Collect(str(tmp_path))])
    trainer.fit(BoringModel())
    for results in rank_states(tmp_path):
        assert results["sum_tensor"].tolist() == [3.0, 30.0]
        assert results["mean_tensor"].tolist() == [0.5, 2.0]
        assert [t.tolist() for t in results["sum_list"]] == [[1.0, 1.0], 3.0]
        assert results["sum_float"] == 2.0 and type(results["sum_float"]) is float
        assert results["mean_float"] == 1.5
        assert results["mean_dict"] == {"a": 0.5, "b": 2.0}
        assert results["gather"].tolist() == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
        assert results["min"] == 5 and type(results["min"]) is int
        assert results["broadcast"] == (2**61, "rank 0")


class CollectDifferentKeys(pl.Callback):
    """Ranks whose dicts differ in their keys, and hold NaN or inf for some: reduced key by key, never positionally."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            values = {"shared": 1.0, "only_rank_0": 3.0, "nan_on_0": float("nan"), "nowhere": float("inf")}
        else:
            values = {"nan_on_0": 5.0, "only_rank_1": -2.0, "nowhere": float("nan"), "shared": 2.0}
        means, sums = mean_across_ranks(trainer, values), sum_across_ranks(trainer, values)
        empty = sum_across_ranks(trainer, {})
        save_rank_state(trainer, self.directory, {"mean": means, "sum": sums, "order": list(means), "empty": empty})


@pytest.mark.ddp
def test_dicts_with_different_keys_are_reduced_key_by_key_over_the_finite_values(tmp_path):
    """The key-safe dict reduction: the union of keys on every rank, a missing or non-finite value left out of its
    key's sum and mean, NaN where no rank has a finite value (was: gloo's size mismatch, an NCCL hang)."""
    trainer = tiny_trainer(
        None, strategy="ddp_fork", devices=2, max_steps=1, callbacks=[CollectDifferentKeys(str(tmp_path))]
    )
    trainer.fit(BoringModel())
    states = rank_states(tmp_path)
    for results in states:
        mean, total = results["mean"], results["sum"]
        assert results["order"] == ["shared", "only_rank_0", "nan_on_0", "nowhere", "only_rank_1"]
        assert {key: mean[key] for key in mean if key != "nowhere"} == {
            "shared": 1.5,
            "only_rank_0": 3.0,
            "nan_on_0": 5.0,
            "only_rank_1": -2.0,
        }
        assert {key: total[key] for key in total if key != "nowhere"} == {
            "shared": 3.0,
            "only_rank_0": 3.0,
            "nan_on_0": 5.0,
            "only_rank_1": -2.0,
        }
        assert math.isnan(mean["nowhere"]) and math.isnan(total["nowhere"])
        assert results["empty"] == {}
