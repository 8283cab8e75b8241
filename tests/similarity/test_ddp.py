import pytest
import pytorch_lightning as pl
import torch

from lightning_nt.similarity import RepresentationSimilarity
from tests.helpers import SaveHistory, TinyClassifier, tiny_trainer


@pytest.mark.ddp
def test_all_ranks_report_the_same_similarities(tmp_path):
    pl.seed_everything(0)
    monitor = RepresentationSimilarity(num_examples=24, metrics=("cka", "intertwiner", "cka_debiased"))
    trainer = tiny_trainer(
        None, strategy="ddp_spawn", devices=2, max_epochs=2, callbacks=[monitor, SaveHistory(monitor, str(tmp_path))]
    )
    trainer.fit(TinyClassifier(num_samples=96))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [entry["epoch"] for entry in rank0] == [0, 1]
    assert rank0 == rank1
    assert 0 < rank0[-1]["similarity/cka/net.2"] < 1
