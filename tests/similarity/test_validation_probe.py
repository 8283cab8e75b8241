"""RepresentationSimilarity(data="val"): the layers' outputs read during validation itself, checked against a
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
        super().__init__(data="val", num_examples=PROBE, **kwargs)
        self.forwards = 0

    def _forward(self, trainer, pl_module, batch):
        self.forwards += 1
        return super()._forward(trainer, pl_module, batch)


def _hidden(module: pl.LightningModule, inputs: Tensor) -> Tensor:
    with torch.no_grad():
        return module.net[:3](inputs)


def _fit(monitor, module=None, callbacks_before=(), **kwargs):
    pl.seed_everything(0)
    module = module or Validated()
    initial = copy.deepcopy(module)
    trainer = tiny_trainer(callbacks=[*callbacks_before, monitor], **{"max_epochs": 3, **kwargs})
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
    monitor = RepresentationSimilarity(data="val", num_examples=PROBE)
    watched, trainer = seeded_fit([monitor], module=module, max_epochs=2)
    assert len(monitor.history) == 2
    assert_same_training(watched, trainer, plain, plain_trainer)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    uninterrupted = RepresentationSimilarity(data="val", num_examples=PROBE)
    _fit(uninterrupted)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)  # saved at validation end, after the measurement
    pl.seed_everything(0)
    trainer = tiny_trainer(
        callbacks=[RepresentationSimilarity(data="val", num_examples=PROBE), saver],
        max_epochs=2,
        enable_checkpointing=True,
    )
    trainer.fit(Validated())
    resumed = RepresentationSimilarity(data="val", num_examples=PROBE)
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
    with pytest.raises(ValueError, match=r"`data='val'`.*val_dataloader.*data='train'"):
        _fit(RepresentationSimilarity(data="val", num_examples=PROBE), NoValidation())


# ---- what the user's module does around the examples: the probe set stays fixed, the module untouched ----------


class Frozen(Validated):
    """lr=0: the weights never move, so every similarity to the initialisation is exactly 1."""

    def __init__(self, **kwargs) -> None:
        super().__init__(lr=0.0, **kwargs)


class AugmentsTraining(Frozen):
    """Lightning's pattern: augment only training batches, here before the transfer, randomly and in place."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        inputs, labels = batch
        if self.trainer.training:
            inputs.add_(torch.randn_like(inputs))
        return inputs, labels


class UpdatesDict(Frozen):
    """A hook that rewrites a dict batch's entry (and one that scales in place after the transfer)."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        inputs, labels = batch
        inputs.mul_(1.5)
        return inputs, labels


@pytest.mark.parametrize("module", [AugmentsTraining, UpdatesDict], ids=["train-only-augmentation", "in-place"])
@pytest.mark.parametrize("data", ["train", "val"])
def test_batch_hooks_neither_change_the_probe_set_nor_augment_validation_examples(module, data):
    monitor = RepresentationSimilarity(data=data, num_examples=PROBE, metrics=("cka", "orthogonal_procrustes"))
    _fit(monitor, module())
    assert len(monitor.history) == 3
    for entry in monitor.history:
        assert entry["similarity/cka/net.2"] == pytest.approx(1.0, abs=1e-9)
        assert entry["similarity/orthogonal_procrustes/net.2"] == pytest.approx(1.0, abs=1e-9)


class KeepsEpochOutputs(Validated):
    """Lightning 2's documented epoch-metric pattern, a flag and a sample logged on the first batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.validation_step_outputs, self.epoch_sizes = [], []

    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        self.validation_step_outputs.append(torch.nn.functional.cross_entropy(self(inputs), labels, reduction="none"))
        if batch_idx == 0:
            self.samples = self(inputs[:3])  # a few examples: no representation of the batch

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.epoch_sizes.append(len(torch.cat(self.validation_step_outputs)))
        self.validation_step_outputs.clear()


@pytest.mark.parametrize("val_shuffle", [False, True], ids=["read", "forward-pass"])
def test_the_callbacks_own_validation_steps_leave_the_modules_attributes_alone(val_shuffle):
    module = KeepsEpochOutputs(val_shuffle=val_shuffle)
    monitor = RepresentationSimilarity(data="val", num_examples=PROBE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _fit(monitor, module)
    assert module.epoch_sizes == [40, 40, 40]  # validation's own examples only
    assert all("similarity/cka/net.2" in entry for entry in monitor.history) and len(monitor.history) == 3
    assert not hasattr(module, "samples") or module.samples.shape[0] == 3
    assert monitor.layer_cka is not None and monitor.layer_cka.shape == (1, 1)


class TwiceOnTheFirstBatch(Validated):
    def validation_step(self, batch, batch_idx):
        self(batch[0])
        if batch_idx == 0:
            self.first_predictions = self(batch[0]).argmax(-1)


def test_a_validation_step_that_runs_the_layers_otherwise_on_some_batches_is_measured_by_a_forward_pass():
    monitor = CountedForwards()
    with pytest.warns(UserWarning, match="a different number of times"):
        trained, initial = _fit(monitor, TwiceOnTheFirstBatch())
    assert monitor.forwards == 2 + 3
    inputs = monitor._probe.tensors()[0]
    expected = similarities(_hidden(trained, inputs), _hidden(initial, inputs), monitor.metrics, "tanh")
    for call in (0, 1):  # the probe set's forward pass (batch_idx 0) runs the layer twice
        assert monitor.history[-1][f"similarity/cka/net.2#{call}"] == pytest.approx(expected["cka"], abs=1e-6)


def test_a_checkpoint_saved_between_the_last_batch_and_validation_resumes_with_every_measurement(tmp_path):
    uninterrupted = RepresentationSimilarity(data="val", num_examples=PROBE)
    _fit(uninterrupted)
    pl.seed_everything(0)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")  # epoch ends
    tiny_trainer(
        callbacks=[RepresentationSimilarity(data="val", num_examples=PROBE), saver],
        max_epochs=3,
        enable_checkpointing=True,
    ).fit(Validated())
    resumed = RepresentationSimilarity(data="val", num_examples=PROBE)
    pl.seed_everything(123)
    tiny_trainer(callbacks=[resumed], max_epochs=3).fit(Validated(), ckpt_path=str(tmp_path / "step=4.ckpt"))
    assert [entry["epoch"] for entry in resumed.history] == [0, 1, 2]
    for entry, expected in zip(resumed.history, uninterrupted.history):
        assert entry == pytest.approx(expected)


def test_validation_with_other_weights_and_epochs_without_validation_warn_that_the_history_mixes_them():
    averaging = pl.callbacks.EMAWeightAveraging(decay=0.5)
    with pytest.warns(UserWarning, match="mixes the two networks"):
        _fit(
            RepresentationSimilarity(data="val", num_examples=PROBE),
            max_epochs=4,
            check_val_every_n_epoch=2,
            callbacks_before=[averaging],
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*mixes the two networks.*")
        _fit(
            RepresentationSimilarity(data="val", num_examples=PROBE),
            max_epochs=2,
            callbacks_before=[pl.callbacks.EMAWeightAveraging(decay=0.5)],
        )


class FailsInValidation(Validated):
    def validation_step(self, batch, batch_idx):
        self(batch[0])
        if not self.trainer.sanity_checking and batch_idx == 1:
            raise RuntimeError("boom")


def test_after_a_failed_validation_nothing_is_measured_outside_a_fit():
    monitor = RepresentationSimilarity(data="val", num_examples=PROBE)
    module = FailsInValidation()
    trainer = tiny_trainer(callbacks=[monitor], max_epochs=2)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module)
    assert not module.net[2]._forward_hooks
    module.validation_step = Validated.validation_step.__get__(module)
    trainer.validate(module, verbose=False)
    assert monitor.history == []


class NamedValidationLoaders(Validated):
    def val_dataloader(self):
        return {"clean": super().val_dataloader(), "other": DataLoader(classification_data(8, 8, 3, seed=5))}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self(batch[0])


def test_the_first_of_named_validation_loaders_is_read():
    monitor = CountedForwards()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*RepresentationSimilarity.*")
        _fit(monitor, NamedValidationLoaders())
    assert torch.equal(monitor._probe.tensors()[0], Validated().val_dataloader().dataset.tensors[0][:PROBE])
    assert monitor.forwards == 2 and len(monitor.history) == 3


class OnlyAFewExamples(Validated):
    def validation_step(self, batch, batch_idx):
        self(batch[0][:3])


def test_layers_that_never_see_the_whole_batch_are_refused_not_dropped_silently():
    with pytest.raises(ValueError, match="no compared layer"):
        _fit(RepresentationSimilarity(data="val", num_examples=PROBE), OnlyAFewExamples())
