import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import SharpnessMonitor
from tests.helpers import SaveHistory, TinyClassifier, tiny_trainer


@pytest.mark.ddp
def test_all_ranks_measure_the_same_sharpness_without_hanging(tmp_path):
    pl.seed_everything(0)
    monitor = SharpnessMonitor(
        max_overhead=None, every_n_steps=2, num_examples=24, num_eigenvalues=2, trace=True, batch_sharpness=True
    )
    trainer = tiny_trainer(
        None, strategy="ddp_spawn", devices=2, max_epochs=1, callbacks=[monitor, SaveHistory(monitor, str(tmp_path))]
    )
    trainer.fit(TinyClassifier(num_samples=96))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert [e["step"] for e in rank0] == [0, 2]
    for a, b in zip(rank0, rank1):
        for tag in ("sharpness/lambda_max", "sharpness/lambda_2", "sharpness/lambda_min", "sharpness/trace"):
            assert a[tag] == b[tag], tag
        assert a["sharpness/batch_sharpness"] == pytest.approx(b["sharpness/batch_sharpness"])
