import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt.common import ProbeSet, batch_size
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
