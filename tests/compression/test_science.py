"""The bound on the digits: non-vacuous after subspace training, vacuous post hoc and on random labels."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import TensorDataset

from lightning_nt import CompressionBoundReporter, SubspaceTraining
from lightning_nt.demos import DigitsDataModule, DigitsMLP
from tests.helpers import tiny_trainer


class RandomLabelDigits(DigitsDataModule):
    """The digits with every label (train and validation) replaced by a uniformly random class."""

    def setup(self, stage=None):
        super().setup(stage)
        generator = torch.Generator().manual_seed(1)
        for name in ("train_set", "val_set"):
            images, labels = getattr(self, name).tensors
            setattr(self, name, TensorDataset(images, torch.randint(10, labels.shape, generator=generator)))


def _bound(datamodule, dimension=None, epochs=30):
    pl.seed_everything(0)
    reporter = CompressionBoundReporter(arora=False, capacity=False)
    callbacks = [reporter] if dimension is None else [SubspaceTraining(dimension=dimension), reporter]
    trainer = tiny_trainer(None, max_epochs=epochs, callbacks=callbacks)
    trainer.fit(DigitsMLP(optimizer="adam", lr=0.05 if dimension else 0.01), datamodule)
    return reporter.report


@pytest.mark.slow
def test_subspace_training_gives_a_non_vacuous_bound_that_holds_on_held_out_data():
    subspace = _bound(DigitsDataModule(), dimension=120)
    assert subspace["compression/num_examples"] == 1438
    assert subspace["compression/test_error"] < subspace["compression/error_bound"] < 0.5
    posthoc = _bound(DigitsDataModule(), epochs=10)  # the same MLP, all 38k parameters trained
    assert posthoc["compression/train_error"] < subspace["compression/train_error"]
    assert posthoc["compression/error_bound"] > 0.9 > subspace["compression/error_bound"] + 0.4


@pytest.mark.slow
def test_random_labels_get_a_vacuous_bound_that_still_holds():
    report = _bound(RandomLabelDigits(), dimension=120)
    assert report["compression/test_error"] > 0.8  # nothing to learn
    assert report["compression/error_bound"] >= 0.9
    assert report["compression/error_bound"] > report["compression/test_error"]
