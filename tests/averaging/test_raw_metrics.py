"""`compare_raw` reports what Lightning itself would report for the raw weights: same reductions, same keys."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from lightning_nt import IterateAveraging
from tests.helpers import TinyClassifier, tiny_trainer
from tests.helpers.models import classification_data


class EveryReduction(TinyClassifier):
    """Two validation loaders of different batch sizes; values logged with every `reduce_fx` and a torchmetric."""

    def __init__(self, loaders: int, **kwargs):
        super().__init__(**kwargs)
        self.val_accuracy = MulticlassAccuracy(num_classes=self.classes, average="micro")
        self.loaders = loaders

    def val_dataloader(self):
        loaders = [
            DataLoader(classification_data(40, self.dim, self.classes, seed=1), batch_size=16),
            DataLoader(classification_data(25, self.dim, self.classes, seed=2), batch_size=10),
        ]
        return loaders if self.loaders > 1 else loaders[1]

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        inputs, labels = batch
        logits = self(inputs)
        losses = F.cross_entropy(logits, labels, reduction="none")
        self.log("val_loss", losses.mean())
        self.log("val_max", losses.max(), reduce_fx="max")
        self.log("val_min", losses.min(), reduce_fx="min")
        self.log("val_sum", losses.sum(), reduce_fx="sum")
        self.log("val_forked", losses.mean(), on_step=True)
        self.log("val_count", float(len(labels)), reduce_fx="sum")
        self.val_accuracy(logits, labels)
        self.log("val_acc", self.val_accuracy)


@pytest.mark.parametrize("loaders", [1, 2])
def test_raw_metrics_are_what_lightning_reports_for_the_raw_weights(loaders):
    pl.seed_everything(0)
    module = EveryReduction(loaders, num_samples=96)
    trainer = tiny_trainer(None, max_epochs=2, callbacks=[IterateAveraging(compare_raw=True, apply_on_end=False)])
    trainer.fit(module)
    raw = {name[len("raw/") :]: value.item() for name, value in trainer.callback_metrics.items() if name[:4] == "raw/"}
    # the last validation ran after the last step: the module's raw weights now are the ones compared there
    validator = tiny_trainer(None)
    validator.validate(module, verbose=False)
    lightning = {name: value.item() for name, value in validator.callback_metrics.items()}
    suffix = "/dataloader_idx_1" if loaders > 1 else ""
    assert f"val_max{suffix}" in lightning and f"val_forked_epoch{suffix}" in lightning
    assert raw.keys() == lightning.keys()
    for name, value in lightning.items():
        assert raw[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    assert raw[f"val_count{suffix}"] == 25.0
    averaged = trainer.callback_metrics[f"val_max{suffix}"].item()
    assert averaged != pytest.approx(raw[f"val_max{suffix}"])  # the average was validated, not the raw weights
    assert torch.isfinite(torch.tensor(list(raw.values()))).all()


class TagRecorder(pl.loggers.Logger):
    """A logger that keeps the tags it is sent."""

    def __init__(self):
        super().__init__()
        self.tags = set()

    @property
    def name(self):
        return "recorder"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.tags |= metrics.keys()

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class HiddenAndForked(TinyClassifier):
    def validation_step(self, batch, batch_idx):
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("val_loss", loss)
        self.log("val_hidden", loss, logger=False)
        self.log("val_forked", loss, on_step=True)


def test_raw_metrics_reach_the_loggers_as_lightning_sends_the_originals():
    """`logger=False` keeps a value out of the loggers, raw or not; a value logged on step and epoch reaches the
    loggers as `<name>_epoch` only (its `<name>_step` values are per validation batch, which raw/ does not re-log)."""
    pl.seed_everything(0)
    recorder = TagRecorder()
    trainer = tiny_trainer(None, logger=recorder, callbacks=[IterateAveraging(compare_raw=True, apply_on_end=False)])
    trainer.fit(HiddenAndForked(num_samples=96))
    validation = {tag for tag in recorder.tags if tag.startswith("val_") and not tag.endswith("_step")}
    assert validation == {"val_loss", "val_forked_epoch"}
    assert {tag for tag in recorder.tags if tag.startswith("raw/")} == {f"raw/{tag}" for tag in validation}
    raw_callback = {name for name in trainer.callback_metrics if name.startswith("raw/")}
    assert raw_callback == {"raw/val_loss", "raw/val_hidden", "raw/val_forked", "raw/val_forked_epoch"}
