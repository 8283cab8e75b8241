import pytest
import pytorch_lightning as pl
import torch

from lightning_nt.laziness import LazinessMonitor
from tests.helpers import SaveHistory, tiny_trainer
from tests.laziness.models import ReLUClassifier


@pytest.mark.ddp
def test_every_rank_logs_the_mean_of_the_ranks_measurements(tmp_path):
    pl.seed_everything(0)
    monitor = LazinessMonitor(every_n_steps=2, num_examples=12)
    trainer = tiny_trainer(
        None, strategy="ddp_spawn", devices=2, max_epochs=1, callbacks=[monitor, SaveHistory(monitor, str(tmp_path))]
    )
    trainer.fit(ReLUClassifier(num_samples=64))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [entry["step"] for entry in rank0] == [entry["step"] for entry in rank1] == [0, 2]
    for mine, theirs in zip(rank0, rank1):
        for tag in mine.keys() - {"laziness/seconds"}:
            assert mine[tag] == theirs[tag], tag
    assert rank0[-1]["laziness/ntk_change"] > 0
