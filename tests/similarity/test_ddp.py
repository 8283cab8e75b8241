import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_nt.similarity import RepresentationSimilarity
from tests.helpers import SaveHistory, TinyClassifier, assert_ranks_agree, rank_states, save_rank_state, tiny_trainer


@pytest.mark.ddp
@pytest.mark.parametrize(("data", "num_examples"), [("train", 24), ("val", 12)])  # val: 16 examples a rank
def test_all_ranks_report_the_same_similarities(tmp_path, data, num_examples):
    pl.seed_everything(0)
    monitor = RepresentationSimilarity(
        num_examples=num_examples, metrics=("cka", "intertwiner", "cka_debiased"), data=data
    )
    trainer = tiny_trainer(
        None, strategy="ddp_fork", devices=2, max_epochs=2, callbacks=[monitor, SaveHistory(monitor, str(tmp_path))]
    )
    trainer.fit(TinyClassifier(num_samples=96))
    states = rank_states(tmp_path)
    assert_ranks_agree(states)
    rank0 = states[0]
    assert [entry["epoch"] for entry in rank0] == [0, 1]
    assert 0 < rank0[-1]["similarity/cka/net.2"] < 1


class ConvClassifier(TinyClassifier):
    """``TinyClassifier`` with a convolution over its 8 inputs: a ReLU output ``[n, 4, 8]``, 8 rows per example."""

    def __init__(self):
        super().__init__(num_samples=96, shuffle=False)
        self.conv, self.act = nn.Conv1d(1, 4, 3, padding=1), nn.ReLU()

    def forward(self, inputs):
        return self.net(inputs) + self.act(self.conv(inputs.unsqueeze(1))).mean(dim=(1, 2)).unsqueeze(1)


class CheckReferenceRows(pl.Callback):
    """On each rank: the callback's reference rows against the documented rows of every rank's whole ReLU output on
    its probe set, gathered independently (saved for the parent with the rows themselves)."""

    def __init__(self, monitor, directory):
        self.monitor, self.directory = monitor, directory

    def on_train_start(self, trainer, pl_module):
        inputs = next(self.monitor._probe.chunks())[0][0]
        with torch.no_grad():
            local = pl_module.act(pl_module.conv(inputs.unsqueeze(1)))
        whole = trainer.strategy.all_gather(local).flatten(0, 1)
        rows = whole.movedim(1, -1).reshape(-1, 4)
        expected = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:100]]
        kept = self.monitor._reference_features["act"]
        save_rank_state(trainer, self.directory, {"equal": torch.equal(kept, expected), "rows": kept})


@pytest.mark.ddp
def test_the_rows_kept_on_each_rank_are_the_rows_of_the_gathered_outputs(tmp_path):
    """Each rank keeps its share of the 100 rows picked among the 2 x 24 x 8 = 384 rows of the gathered outputs; the
    gathered shares are those rows, in the documented order, on every rank."""
    pl.seed_everything(0)
    monitor = RepresentationSimilarity(num_examples=24, layers={"act": "relu"}, max_rows=100)
    checker = CheckReferenceRows(monitor, str(tmp_path))
    trainer = tiny_trainer(None, strategy="ddp_spawn", devices=2, max_epochs=1, callbacks=[monitor, checker])
    trainer.fit(ConvClassifier())
    states = rank_states(tmp_path)
    assert_ranks_agree(states)
    assert states[0]["equal"] and states[0]["rows"].shape == (100, 4)
