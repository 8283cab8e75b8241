import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch

from lightning_nt.common import log_figure, log_scalars, log_text
from tests.helpers import TinyClassifier, read_tensorboard_scalars, read_tensorboard_tags, tiny_trainer


class ReportFromForbiddenHooks(pl.Callback):
    """Logs where `self.log` is not allowed."""

    def on_fit_start(self, trainer, pl_module):
        log_scalars(trainer, {"probe/at_fit_start": 1.5})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        log_scalars(trainer, {"probe/per_step": float(batch_idx)})

    def on_train_end(self, trainer, pl_module):
        log_scalars(trainer, {"probe/at_train_end": torch.tensor(2.5)}, step=123)
        log_text(trainer, "probe/table", "| a | b |\n|---|---|\n| 1 | 2 |")
        figure, axes = plt.subplots()
        axes.plot([0, 1], [1, 0])
        log_figure(trainer, "probe/picture", figure)


def test_every_logger_gets_each_value_once(tmp_path):
    tensorboard = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version="")
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version="")
    trainer = tiny_trainer(tmp_path, logger=[tensorboard, csv_logger], callbacks=[ReportFromForbiddenHooks()])
    trainer.fit(TinyClassifier(num_samples=48))

    scalars = read_tensorboard_scalars(tmp_path / "tb")
    assert scalars["probe/at_fit_start"] == [(0, 1.5)]
    assert scalars["probe/per_step"] == [(1, 0.0), (2, 1.0), (3, 2.0)]
    assert scalars["probe/at_train_end"] == [(123, 2.5)]
    tags = read_tensorboard_tags(tmp_path / "tb")
    assert "probe/picture" in tags["images"]
    assert any(tag.startswith("probe/table") for tag in tags["tensors"])

    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["probe/at_train_end"] for row in rows if row["probe/at_train_end"]] == ["2.5"]
    assert trainer.callback_metrics["probe/per_step"] == torch.tensor(2.0)
    assert trainer.callback_metrics["probe/at_train_end"] == torch.tensor(2.5)


def test_works_without_any_logger():
    trainer = tiny_trainer(None, callbacks=[ReportFromForbiddenHooks()])
    trainer.fit(TinyClassifier(num_samples=16))
    assert trainer.callback_metrics["probe/per_step"] == torch.tensor(0.0)
