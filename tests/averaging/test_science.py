"""Granziol et al.: with a large constant learning rate, the tail average beats the final iterate."""

import pytest
import pytorch_lightning as pl

from lightning_nt import IterateAveraging
from lightning_nt.demos import DigitsCNN, DigitsDataModule
from tests.helpers import tiny_trainer


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_tail_average_beats_the_final_iterate_at_a_large_learning_rate(seed):
    pl.seed_everything(seed)
    averaging = IterateAveraging(mode="uniform", start_epoch=10, compare_raw=True, apply_on_end=False)
    trainer = tiny_trainer(None, max_epochs=20, callbacks=[averaging])
    trainer.fit(DigitsCNN(lr=0.2, momentum=0.9), DigitsDataModule(batch_size=32, seed=seed))
    averaged, raw = trainer.callback_metrics["val/loss"].item(), trainer.callback_metrics["raw/val/loss"].item()
    assert averaging.n_averaged == 10 * 45
    assert averaged < 0.9 * raw
