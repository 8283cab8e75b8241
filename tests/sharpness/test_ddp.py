import pytest
import pytorch_lightning as pl

from lightning_nt import SharpnessMonitor
from tests.helpers import SaveHistory, TinyClassifier, assert_ranks_agree, rank_states, tiny_trainer


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
    states = rank_states(tmp_path)
    assert [e["step"] for e in states[0]] == [0, 2]
    timings = {"sharpness/seconds", "sharpness/overhead"}  # each process's own clock
    assert_ranks_agree(states, ignore=timings, approx={"sharpness/batch_sharpness"})
