import pytest
import pytorch_lightning as pl

from lightning_nt import IterateAveraging
from tests.helpers import TinyClassifier, assert_ranks_agree, rank_states, save_rank_state, tiny_trainer


class SaveAverage(pl.Callback):
    """ddp_spawn does not send callback state back to the parent: each rank writes its average to a file."""

    def __init__(self, averaging: IterateAveraging, directory: str) -> None:
        self.averaging, self.directory = averaging, directory

    def on_train_end(self, trainer, pl_module):
        averages = self.averaging.averaged_state_dict()
        save_rank_state(trainer, self.directory, (self.averaging.n_averaged, averages))


@pytest.mark.ddp
def test_every_rank_holds_the_same_average(tmp_path):
    pl.seed_everything(0)
    averaging = IterateAveraging(mode="ema", decay=0.9, bn="average", apply_on_end=False)
    trainer = tiny_trainer(
        None,
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        callbacks=[averaging, SaveAverage(averaging, str(tmp_path))],
    )
    trainer.fit(TinyClassifier(num_samples=96, norm="batch"))
    states = rank_states(tmp_path)
    assert states[0][0] == 6  # 96 examples, 2 ranks, batch 16: 3 steps per epoch
    assert states[0][1].keys() == states[1][1].keys()
    statistics = [name for name, _ in TinyClassifier(norm="batch").named_buffers()]
    # BatchNorm statistics are per rank (DDP broadcasts rank 0's at each forward)
    assert_ranks_agree(states, ignore=statistics)
