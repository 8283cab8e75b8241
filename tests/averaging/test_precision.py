import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import IterateAveraging
from tests.helpers import TinyClassifier


class RawWeightsUnchangedByValidation(pl.Callback):
    """Records the raw weights after the epoch's last step and compares them once validation has run."""

    def __init__(self):
        self.checks = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_epoch_end(self, trainer, pl_module):
        assert all(torch.equal(a, b) for a, b in zip(self.before, pl_module.parameters()))
        self.checks += 1


ON_CPU = [("cpu", "32-true"), ("cpu", "bf16-true")]
ON_GPU = [pytest.param("gpu", p, marks=pytest.mark.cuda) for p in ("32-true", "bf16-mixed", "bf16-true")]


@pytest.mark.parametrize(("accelerator", "precision"), ON_CPU + ON_GPU)
def test_averages_stay_fp32_and_raw_weights_come_back(accelerator, precision):
    pl.seed_everything(0)
    averaging = IterateAveraging(mode="ema", decay=0.9, apply_on_end=False)
    check = RawWeightsUnchangedByValidation()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[averaging, check],
    )
    trainer.fit(TinyClassifier(num_samples=96, norm="batch"))
    average = averaging.averaged_state_dict()
    device = "cuda" if accelerator == "gpu" else "cpu"
    assert averaging.n_averaged == 12 and check.checks == 2
    assert all(t.device.type == device and t.dtype == torch.float32 for k, t in average.items())
    assert torch.isfinite(trainer.callback_metrics["val_loss"])
