import dataclasses
import io
from typing import NamedTuple

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_nt.common import ProbeSet, batch_size, prepare_batch, tensors_of
from lightning_nt.common.probe import _restored, examples_of_this_rank
from lightning_nt.laziness import LazinessMonitor
from lightning_nt.similarity import RepresentationSimilarity
from tests.helpers import TinyClassifier, classification_data, tiny_trainer


def test_concatenates_the_first_examples_exactly():
    data = classification_data(50)
    probe = ProbeSet.from_batches(DataLoader(data, batch_size=16), num_examples=40)
    (inputs, labels), share = next(probe.chunks())
    assert len(probe) == 40 and share == 1.0
    assert torch.equal(inputs, data.tensors[0][:40]) and torch.equal(labels, data.tensors[1][:40])


def test_chunked_mean_equals_full_mean():
    module = TinyClassifier()
    probe = ProbeSet.from_batches(DataLoader(classification_data(50), batch_size=7), num_examples=45)
    full = sum(F.cross_entropy(module(x), y) * share for (x, y), share in probe.chunks())
    chunked = sum(F.cross_entropy(module(x), y) * share for (x, y), share in probe.chunks(chunk_size=8))
    assert [batch_size(b) for b, _ in probe.chunks(chunk_size=8)] == [8] * 5 + [5]
    assert torch.allclose(full, chunked, atol=1e-6)


def test_dict_batches_and_short_loaders():
    batches = [{"x": torch.randn(3, 2), "y": torch.arange(3), "name": "digits"} for _ in range(2)]
    probe = ProbeSet.from_batches(batches, num_examples=100)
    batch, _ = next(probe.chunks())
    assert len(probe) == 6 and batch["x"].shape == (6, 2) and batch["name"] == "digits"


def test_empty_batches_are_skipped_and_bad_sizes_rejected():
    batches = [(torch.empty(0, 2), torch.empty(0)), (torch.randn(2, 2), torch.ones(2))]
    assert len(ProbeSet.from_batches(batches, num_examples=5)) == 2
    with pytest.raises(ValueError, match="num_examples"):
        ProbeSet.from_batches(batches, num_examples=0)
    with pytest.raises(ValueError, match="first dimension"):
        batch_size((torch.randn(2, 2), torch.ones(3)))
    with pytest.raises(ValueError, match="no examples"):
        ProbeSet.from_batches([], num_examples=3)
    with pytest.raises(TypeError, match="make those fields tensors"):
        ProbeSet.from_batches([(torch.ones(1), "a"), (torch.ones(1), "b")], num_examples=2)


@pytest.mark.parametrize("own_generator", [False, True])
def test_building_from_a_shuffled_loader_leaves_the_training_order_alone(own_generator):
    def loader():
        generator = torch.Generator().manual_seed(5) if own_generator else None
        return DataLoader(TensorDataset(torch.arange(64.0)), batch_size=8, shuffle=True, generator=generator)

    torch.manual_seed(0)
    plain = loader()
    expected = [b[0].tolist() for b in plain]
    torch.manual_seed(0)
    probed = loader()
    ProbeSet.from_dataloader(probed, num_examples=20)
    assert [b[0].tolist() for b in probed] == expected


def test_from_trainer_needs_the_train_dataloader():
    trainer = tiny_trainer()
    with pytest.raises(TypeError, match="on_train_start"):
        ProbeSet.from_trainer(trainer, num_examples=4)


def test_chunks_move_to_device():
    probe = ProbeSet.from_batches([(torch.randn(4, 2), torch.ones(4))], num_examples=4)
    (inputs, _), _ = next(probe.chunks(device="meta"))
    assert inputs.device.type == "meta"


@pytest.mark.parametrize("started", [False, True], ids=["before-the-epoch", "mid-epoch"])
def test_a_probe_leaves_a_persistent_workers_loader_to_the_training_loop(started):
    # persistent_workers: every iter() reset the loop's one cached worker iterator, so a probe read before the first
    # epoch made the loop drop batches, and one read mid-epoch restarted the loop's epoch
    data = classification_data(32)
    loader = DataLoader(data, batch_size=8, num_workers=1, persistent_workers=True)
    loop = iter(loader) if started else None
    seen = [next(loop)[1]] if started else []
    probe = ProbeSet.from_dataloader(loader, num_examples=12)
    assert torch.equal(next(probe.chunks())[0][1], data.tensors[1][:12])
    for _, labels in loop if started else loader:
        seen.append(labels)
    assert torch.equal(torch.cat(seen), data.tensors[1])
    assert [len(labels) for _, labels in loader] == [8] * 4  # the next epoch too


@dataclasses.dataclass
class Example:
    inputs: Tensor
    labels: Tensor
    ids: list[str]


class Identified(TinyClassifier):
    """Its batches carry a string id per example, in a dict (as HuggingFace datasets yield) or a dataclass."""

    def __init__(self, style: str) -> None:
        super().__init__(num_samples=64, shuffle=False)
        self.style = style

    def train_dataloader(self):
        data = classification_data(self.num_samples)
        items = [(inputs, label, f"example-{index}") for index, (inputs, label) in enumerate(zip(*data.tensors))]
        return DataLoader(items, batch_size=16, shuffle=self.shuffle, collate_fn=self._collate)

    def _collate(self, items):
        inputs, labels, ids = (
            torch.stack([i[0] for i in items]),
            torch.stack([i[1] for i in items]),
            [i[2] for i in items],
        )
        return {"input": inputs, "label": labels, "id": ids} if self.style == "dict" else Example(inputs, labels, ids)

    def training_step(self, batch, batch_idx):
        if self.style == "dict":
            return super().training_step((batch["input"], batch["label"]), batch_idx)
        return super().training_step((batch.inputs, batch.labels), batch_idx)


def _comparable(batch):
    """``batch`` with its tensors as nested lists (and their dtypes), so ``==`` compares everything."""
    return apply_to_collection(batch, Tensor, lambda tensor: (tensor.dtype, tensor.tolist()))


def _assert_same_history(resumed, whole):
    """Every entry of both histories equal to float precision, timings aside."""
    assert len(resumed.history) == len(whole.history)
    for mine, theirs in zip(resumed.history, whole.history):
        assert mine.keys() == theirs.keys()
        for tag in mine.keys() - {"laziness/seconds"}:
            assert mine[tag] == pytest.approx(theirs[tag], rel=1e-6), (mine["step"], tag)


def _probe_batch(monitor):
    return (
        next(monitor._probe.chunks())[0] if isinstance(monitor, RepresentationSimilarity) else monitor._initial["batch"]
    )


def _fit_identified(monitor, style, tmp_path=None, **kwargs):
    callbacks = [monitor] if tmp_path is None else [monitor, ModelCheckpoint(dirpath=tmp_path, save_last=True)]
    pl.seed_everything(0)
    module = Identified(style)
    trainer = tiny_trainer(callbacks=callbacks, enable_checkpointing=tmp_path is not None, **kwargs)
    trainer.fit(module)


def _each_style_and_monitor_keeping_a_probe(test):
    """Run ``test`` for dict and dataclass batches with each monitor that checkpoints a probe set."""
    styles = pytest.mark.parametrize("style", ["dict", "dataclass"])
    monitors = pytest.mark.parametrize(
        "monitor",
        [lambda: RepresentationSimilarity(num_examples=24), lambda: LazinessMonitor(every_n_steps=2, num_examples=24)],
        ids=["similarity", "laziness"],
    )
    return styles(monitors(test))


def _whole_and_interrupted_fits(monitor, style, tmp_path):
    """A monitor's uninterrupted 3-epoch fit (returned), and a 2-epoch fit that leaves ``last.ckpt`` in ``tmp_path``."""
    whole = monitor()
    _fit_identified(whole, style, max_epochs=3)
    _fit_identified(monitor(), style, tmp_path, max_epochs=2)
    return whole


@_each_style_and_monitor_keeping_a_probe
def test_a_resumed_probe_set_is_the_saved_one_string_ids_and_all(tmp_path, style, monitor):
    # a checkpoint held the probe set's tensors only: the ids came back from a fresh one-example batch
    whole = _whole_and_interrupted_fits(monitor, style, tmp_path)
    resumed = monitor()
    pl.seed_everything(7)  # another initialisation: the checkpoint's state must win
    tiny_trainer(callbacks=[resumed], max_epochs=3).fit(Identified(style), ckpt_path=str(tmp_path / "last.ckpt"))
    original, restored = _probe_batch(whole), _probe_batch(resumed)
    assert type(restored) is type(original) and _comparable(restored) == _comparable(original)
    assert len(set(original["id"] if style == "dict" else original.ids)) == 24
    _assert_same_history(resumed, whole)


class Pair(NamedTuple):
    inputs: Tensor
    names: tuple[str, ...]


class Nested(TinyClassifier):
    """Its batches: a namedtuple holding a per-example tuple of names, a list of ids and a constant string."""

    def train_dataloader(self):
        names = [(f"name-{index}", f"id-{index}") for index in range(self.num_samples)]
        return DataLoader(
            list(zip(*classification_data(self.num_samples).tensors, names)), batch_size=8, collate_fn=self._collate
        )

    @staticmethod
    def _collate(items):
        pair = Pair(torch.stack([item[0] for item in items]), tuple(item[2][0] for item in items))
        return {
            "pair": pair,
            "label": torch.stack([item[1] for item in items]),
            "id": [item[2][1] for item in items],
            "split": "train",
        }

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["pair"].inputs, batch["label"]), batch_idx)


class RoundTrip(pl.Callback):
    """At the start of training: a probe set, and what a checkpoint of it gives back under weights_only loading."""

    def on_train_start(self, trainer, pl_module):
        self.probe = ProbeSet.from_trainer(trainer, 20)
        buffer = io.BytesIO()
        torch.save(self.probe.state_dict(), buffer)
        buffer.seek(0)
        self.restored = ProbeSet.from_state_dict(torch.load(buffer, weights_only=True), trainer)
        self.old_format = ProbeSet.from_state_dict(self.probe.tensors(), trainer)


def test_a_probe_set_round_trips_through_weights_only_loading():
    check = RoundTrip()
    tiny_trainer(callbacks=[check], max_steps=1).fit(Nested(num_samples=32))
    original, restored = next(check.probe.chunks())[0], next(check.restored.chunks())[0]
    assert type(restored["pair"]) is Pair and _comparable(restored) == _comparable(original)
    assert original["id"] == [f"id-{index}" for index in range(20)] and original["pair"].names[19] == "name-19"
    old = next(check.old_format.chunks())[0]  # checkpoints written before: the tensors come back
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(old), tensors_of(original), strict=True))


def _as_before(state):
    """A callback's state as checkpoints written before ``ProbeSet.state_dict`` held it: the probe's tensors."""
    if "initial" in state:  # LazinessMonitor
        probe = state["initial"].pop("probe")
        state["initial"]["batch_tensors"] = tensors_of(probe["batch"])
    else:
        state["probe"] = tensors_of(state["probe"]["batch"])


@_each_style_and_monitor_keeping_a_probe
def test_checkpoints_holding_only_the_probe_tensors_still_resume(tmp_path, style, monitor):
    whole = _whole_and_interrupted_fits(monitor, style, tmp_path)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=False)
    for key, state in checkpoint["callbacks"].items():
        if "Similarity" in key or "Laziness" in key:
            _as_before(state)
    torch.save(checkpoint, tmp_path / "before.ckpt")
    resumed = monitor()
    tiny_trainer(callbacks=[resumed], max_epochs=3).fit(Identified(style), ckpt_path=str(tmp_path / "before.ckpt"))
    restored, original = _probe_batch(resumed), _probe_batch(whole)
    assert all(torch.equal(a, b) for a, b in zip(tensors_of(restored), tensors_of(original), strict=True))
    _assert_same_history(resumed, whole)


def test_fields_a_weights_only_checkpoint_cannot_hold_come_from_the_loader_with_a_warning(tmp_path):
    """Before: a NumPy array or a path in a probe batch made the whole checkpoint unloadable with weights_only."""
    import pathlib

    import numpy as np

    probe = ProbeSet({"x": torch.arange(4.0)[:, None], "raw": np.arange(4), "paths": [pathlib.Path("a")] * 4})
    with pytest.warns(UserWarning, match="ndarray.*weights_only") as caught:
        torch.save(probe.state_dict(), tmp_path / "probe.pt")
    assert any("PosixPath" in str(w.message) or "Path" in str(w.message) for w in caught)
    state = torch.load(tmp_path / "probe.pt", weights_only=True)
    template = {"x": torch.zeros(1, 1), "raw": np.zeros(1), "paths": [pathlib.Path("b")]}
    restored = _restored(template, state["batch"])
    assert torch.equal(restored["x"], torch.arange(4.0)[:, None])
    assert restored["raw"] is template["raw"] and restored["paths"] == [pathlib.Path("b")] * 4


class BatchHooks(TinyClassifier):
    """Inputs doubled before the batch moves to the device and shifted after it."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch[0] * 2, batch[1]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch[0] + 1, batch[1]


class StepBatches(pl.Callback):
    """The first batch each loop hands its step, beside the probe's preparation of that batch from its loader."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Tensor, ...]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._note("train", trainer, batch, batch_idx, ProbeSet.from_trainer(trainer, 16, "train"))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._note("val", trainer, batch, batch_idx, ProbeSet.from_trainer(trainer, 32, "val"))

    def _note(self, loader, trainer, batch, batch_idx, probe):
        if batch_idx == 0 and loader not in self.seen:
            self.seen[loader] = (*batch, *prepare_batch(trainer, next(probe.chunks())[0]))


def test_a_prepared_probe_batch_is_the_batch_the_loops_hand_their_steps():
    seen = StepBatches()
    tiny_trainer(callbacks=[seen], max_epochs=1, num_sanity_val_steps=0).fit(BatchHooks(shuffle=False))
    for loader in ("train", "val"):
        inputs, labels, prepared_inputs, prepared_labels = seen.seen[loader]
        assert torch.equal(prepared_inputs, inputs) and torch.equal(prepared_labels, labels)
    assert not torch.equal(seen.seen["val"][0], BatchHooks().val_dataloader().dataset.tensors[0])  # hooks ran


def test_a_padding_distributed_sampler_s_repeated_example_is_left_out_of_a_distinct_probe():
    """33 examples on 2 ranks: the sampler pads rank 1's shard with example 0, which rank 0 holds too; 10 on 3 ranks:
    ranks 1 and 2 end with repeats. Under DDP a pooled statistic would see those examples twice."""

    def loader(size, ranks, rank, **options):
        data = TensorDataset(torch.arange(size))
        return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, ranks, rank, **options))

    assert [examples_of_this_rank(loader(33, 2, rank)) for rank in (0, 1)] == [None, 16]
    assert [examples_of_this_rank(loader(10, 3, rank)) for rank in (0, 1, 2)] == [None, 3, 3]
    assert examples_of_this_rank(loader(32, 2, 1)) is None
    assert examples_of_this_rank(loader(33, 2, 1, drop_last=True)) is None
    for ranks, size in ((2, 33), (3, 10), (4, 13)):
        for shuffle in (False, True):
            probes = [
                ProbeSet.from_dataloader(loader(size, ranks, rank, shuffle=shuffle), 100, distinct_across_ranks=True)
                for rank in range(ranks)
            ]
            held = torch.cat([next(probe.chunks())[0][0] for probe in probes])
            assert sorted(held.tolist()) == list(range(size)), (ranks, size, shuffle)
