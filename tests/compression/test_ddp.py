import json

import pytest
import pytorch_lightning as pl

from lightning_nt import CompressionBoundReporter, SubspaceTraining
from tests.helpers import TinyClassifier, tiny_trainer


class SaveReport(pl.Callback):
    """ddp_spawn does not send callback state back to the parent: each rank writes its report to a file."""

    def __init__(self, reporter: CompressionBoundReporter, directory: str) -> None:
        self.reporter, self.directory = reporter, directory

    def on_train_end(self, trainer, pl_module):
        with open(f"{self.directory}/rank{trainer.global_rank}.json", "w") as file:
            json.dump(self.reporter.report, file)


@pytest.mark.ddp
def test_every_rank_certifies_the_whole_training_set_alike(tmp_path):
    pl.seed_everything(0)
    reporter = CompressionBoundReporter(levels=(3, 8), prune=(0.0,), arora=False, stability_samples=32)
    trainer = tiny_trainer(
        None,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        callbacks=[SubspaceTraining(dimension=8), reporter, SaveReport(reporter, str(tmp_path))],
    )
    trainer.fit(TinyClassifier(num_samples=90))  # 45 examples a rank: the sampler pads nothing, but shards
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 == rank1 and rank0["compression/num_examples"] == 90
    assert 0 < rank0["compression/error_bound"] <= 1
