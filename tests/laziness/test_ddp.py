import pytest
import pytorch_lightning as pl

from lightning_nt.laziness import LazinessMonitor
from tests.helpers import SaveHistory, assert_ranks_agree, rank_states, tiny_trainer
from tests.laziness.models import ReLUClassifier


@pytest.mark.ddp
def test_every_rank_logs_the_mean_of_the_ranks_measurements(tmp_path):
    pl.seed_everything(0)
    monitor = LazinessMonitor(every_n_steps=2, num_examples=12)
    trainer = tiny_trainer(
        None, strategy="ddp_spawn", devices=2, max_epochs=1, callbacks=[monitor, SaveHistory(monitor, str(tmp_path))]
    )
    trainer.fit(ReLUClassifier(num_samples=64))
    states = rank_states(tmp_path)
    assert_ranks_agree(states, ignore={"laziness/seconds"})
    assert [entry["step"] for entry in states[0]] == [0, 2]
    assert states[0][-1]["laziness/ntk_change"] > 0
