import pytest
import pytorch_lightning as pl

from lightning_nt import CompressionBoundReporter, SubspaceTraining
from tests.helpers import TinyClassifier, assert_ranks_agree, rank_states, save_rank_state, tiny_trainer


class SaveReport(pl.Callback):
    """ddp_spawn does not send callback state back to the parent: each rank writes its report to a file."""

    def __init__(self, reporter: CompressionBoundReporter, directory: str) -> None:
        self.reporter, self.directory = reporter, directory

    def on_train_end(self, trainer, pl_module):
        save_rank_state(trainer, self.directory, self.reporter.report)


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
    states = rank_states(tmp_path)
    assert_ranks_agree(states)
    rank0 = states[0]
    assert rank0["compression/num_examples"] == 90
    assert 0 < rank0["compression/error_bound"] <= 1
