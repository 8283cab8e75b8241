import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import IterateAveraging
from tests.helpers import TinyClassifier, tiny_trainer


class SaveAverage(pl.Callback):
    """ddp_spawn does not send callback state back to the parent: each rank writes its average to a file."""

    def __init__(self, averaging: IterateAveraging, directory: str) -> None:
        self.averaging, self.directory = averaging, directory

    def on_train_end(self, trainer, pl_module):
        averages = self.averaging.averaged_state_dict()
        torch.save((self.averaging.n_averaged, averages), f"{self.directory}/rank{trainer.global_rank}.pt")


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
    n0, rank0 = torch.load(tmp_path / "rank0.pt")
    n1, rank1 = torch.load(tmp_path / "rank1.pt")
    assert n0 == n1 == 6  # 96 examples, 2 ranks, batch 16: 3 steps per epoch
    assert rank0.keys() == rank1.keys()
    parameters = [name for name, _ in TinyClassifier(norm="batch").named_parameters()]
    for name in parameters:  # BatchNorm statistics are per rank (DDP broadcasts rank 0's at each forward)
        assert torch.equal(rank0[name], rank1[name]), name
