import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import IterateAveraging
from tests.helpers import TinyClassifier


class RawSnapshot(pl.Callback):
    def on_validation_start(self, trainer, pl_module):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_validation_end(self, trainer, pl_module):
        assert all(torch.equal(a, b) for a, b in zip(self.before, pl_module.parameters()))


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
def test_on_gpu_averages_stay_fp32_and_raw_weights_come_back(precision):
    pl.seed_everything(0)
    averaging = IterateAveraging(mode="ema", decay=0.9, apply_on_end=False)
    snapshot = RawSnapshot()
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision=precision,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[averaging, snapshot],
    )
    trainer.fit(TinyClassifier(num_samples=96, norm="batch"))
    average = averaging.averaged_state_dict()
    assert averaging.n_averaged == 12
    assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in average.values())
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
