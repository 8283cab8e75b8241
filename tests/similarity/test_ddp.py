import pytest
import pytorch_lightning as pl

from lightning_nt.similarity import RepresentationSimilarity
from tests.helpers import SaveHistory, TinyClassifier, assert_ranks_agree, rank_states, tiny_trainer


@pytest.mark.ddp
@pytest.mark.parametrize(("data", "num_examples"), [("train", 24), ("val", 12)])  # val: 16 examples a rank
def test_all_ranks_report_the_same_similarities(tmp_path, data, num_examples):
    pl.seed_everything(0)
    monitor = RepresentationSimilarity(
        num_examples=num_examples, metrics=("cka", "intertwiner", "cka_debiased"), data=data
    )
    trainer = tiny_trainer(
        None, strategy="ddp_spawn", devices=2, max_epochs=2, callbacks=[monitor, SaveHistory(monitor, str(tmp_path))]
    )
    trainer.fit(TinyClassifier(num_samples=96))
    states = rank_states(tmp_path)
    assert_ranks_agree(states)
    rank0 = states[0]
    assert [entry["epoch"] for entry in rank0] == [0, 1]
    assert 0 < rank0[-1]["similarity/cka/net.2"] < 1
