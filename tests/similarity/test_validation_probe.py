"""RepresentationSimilarity(probe_data="val"): the layers' outputs read during validation itself, checked against a
forward pass of the core on the probe set's own examples, and the forward pass it falls back to where validation
runs other examples."""

import copy
import warnings

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_nt.similarity import RepresentationSimilarity, similarities
from tests.helpers import TinyClassifier, assert_same_training, classification_data, seeded_fit, tiny_trainer

PROBE = 20  # examples: the first validation batch of 16 and 4 of the second


class Validated(TinyClassifier):
    """Validation over 40 examples in batches of 16 (16, 16, 8), in order unless ``val_shuffle``."""

    def __init__(self, val_shuffle: bool = False, **kwargs) -> None:
        super().__init__(num_samples=64, shuffle=False, **kwargs)
        self.val_shuffle = val_shuffle

    def val_dataloader(self) -> DataLoader:
        data = classification_data(40, self.dim, self.classes, seed=1)
        return DataLoader(data, batch_size=16, shuffle=self.val_shuffle)


class BatchHooks(Validated):
    """Inputs doubled before the batch moves to the device and shifted after: the steps see neither loader's."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        return batch[0] * 2, batch[1]

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return batch[0] + 1, batch[1]


class CountedForwards(RepresentationSimilarity):
    """Counts the forward passes the callback runs itself."""

    def __init__(self, **kwargs) -> None:
        super().__init__(probe_data="val", num_examples=PROBE, **kwargs)
        self.forwards = 0

    def _forward(self, trainer, pl_module, batch):
        self.forwards += 1
        return super()._forward(trainer, pl_module, batch)


def _hidden(module: pl.LightningModule, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return module.net[:3](inputs)


def _fit(monitor, module=None, **kwargs):
    pl.seed_everything(0)
    module = module or Validated()
    initial = copy.deepcopy(module)
    trainer = tiny_trainer(callbacks=[monitor], **{"max_epochs": 3, **kwargs})
    trainer.fit(module)
    return module, initial


def _assert_last_equals_the_core(monitor, module, initial):
    inputs = monitor._probe.tensors()[0]  # the probe set's own examples, as cached
    expected = similarities(_hidden(module, inputs), _hidden(initial, inputs), monitor.metrics, "tanh")
    for metric, value in expected.items():
        assert monitor.history[-1][f"similarity/{metric}/net.2"] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize("module", [Validated, BatchHooks], ids=["plain", "batch-hooks"])
def test_outputs_are_read_during_validation_without_a_forward_pass_of_the_callbacks_own(module):
    monitor = CountedForwards()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*RepresentationSimilarity.*")
        trained, initial = _fit(monitor, module())
    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 2]
    assert monitor.forwards == 2  # the reference's features at the start and the CKA matrix at the end only
    inputs = Validated().val_dataloader().dataset.tensors[0][:PROBE]
    assert torch.equal(monitor._probe.tensors()[0], inputs)
    if module is BatchHooks:
        inputs = inputs * 2 + 1
    expected = similarities(_hidden(trained, inputs), _hidden(initial, inputs), monitor.metrics, "tanh")
    for metric, value in expected.items():
        assert monitor.history[-1][f"similarity/{metric}/net.2"] == pytest.approx(value, abs=1e-6)


@pytest.mark.parametrize(
    ("module", "trainer_kwargs", "fallbacks"),
    [
        # other examples than the probe set's, except where a validation draws the order the probe set was read in
        (lambda: Validated(val_shuffle=True), {}, range(1, 4)),
        (Validated, {"limit_val_batches": 1}, [3]),  # 16 validation examples, fewer than the probe set's 20
    ],
    ids=["shuffled", "short"],
)
def test_where_validation_runs_other_examples_a_forward_pass_measures_with_one_warning(
    module, trainer_kwargs, fallbacks
):
    monitor = CountedForwards()
    with pytest.warns(UserWarning, match="forward pass of validation_step") as caught:
        trained, initial = _fit(monitor, module(), **trainer_kwargs)
    assert sum("forward pass of validation_step" in str(w.message) for w in caught) == 1
    assert monitor.forwards - 2 in fallbacks
    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 2]
    _assert_last_equals_the_core(monitor, trained, initial)


def test_an_epoch_without_validation_is_measured_after_it():
    monitor = CountedForwards()
    module, initial = _fit(monitor, check_val_every_n_epoch=2)
    assert [entry["epoch"] for entry in monitor.history] == [0, 1, 2]
    assert monitor.forwards == 2 + 2  # epochs 0 and 2 had no validation
    _assert_last_equals_the_core(monitor, module, initial)


def test_a_run_with_the_validation_probe_is_bitwise_the_run_without():
    def module():
        return Validated(norm="batch")

    plain, plain_trainer = seeded_fit([], module=module, max_epochs=2)
    monitor = RepresentationSimilarity(probe_data="val", num_examples=PROBE)
    watched, trainer = seeded_fit([monitor], module=module, max_epochs=2)
    assert len(monitor.history) == 2
    assert_same_training(watched, trainer, plain, plain_trainer)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    uninterrupted = RepresentationSimilarity(probe_data="val", num_examples=PROBE)
    _fit(uninterrupted)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # saved at validation end, after the measurement
    pl.seed_everything(0)
    trainer = tiny_trainer(
        callbacks=[RepresentationSimilarity(probe_data="val", num_examples=PROBE), saver],
        max_epochs=2,
        enable_checkpointing=True,
    )
    trainer.fit(Validated())
    resumed = RepresentationSimilarity(probe_data="val", num_examples=PROBE)
    pl.seed_everything(123)
    trainer = tiny_trainer(callbacks=[resumed], max_epochs=3)
    trainer.fit(Validated(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert len(resumed.history) == 3
    for entry, expected in zip(resumed.history, uninterrupted.history):
        assert entry == pytest.approx(expected)


class NoValidation(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinyClassifier().net

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(classification_data(32, 8, 3), batch_size=16)


def test_without_a_validation_loader_the_argument_is_named():
    with pytest.raises(ValueError, match=r"`probe_data='val'`.*probe_data='train'"):
        _fit(RepresentationSimilarity(probe_data="val", num_examples=PROBE), NoValidation())
