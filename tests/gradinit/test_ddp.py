import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import GradInit
from tests.helpers import TinyClassifier, assert_ranks_agree, rank_states, save_rank_state, tiny_trainer


class SaveWeights(pl.Callback):
    def __init__(self, directory):
        self.directory = directory

    def on_train_start(self, trainer, pl_module):  # runs after GradInit (earlier in the callback list)
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        save_rank_state(trainer, self.directory, weights)


@pytest.mark.ddp
def test_every_rank_gets_the_same_scales(tmp_path):
    pl.seed_everything(0)
    initial = {n: p.detach().clone() for n, p in TinyClassifier(num_samples=96).named_parameters()}
    pl.seed_everything(0)
    trainer = tiny_trainer(
        None,
        strategy="ddp_spawn",
        devices=2,
        max_steps=1,
        callbacks=[GradInit(iterations=10, lr=0.05), SaveWeights(str(tmp_path))],
    )
    trainer.fit(TinyClassifier(num_samples=96))
    states = rank_states(tmp_path)
    assert_ranks_agree(states)
    rank0 = states[0]
    assert any(not torch.allclose(rank0[name], initial[name]) for name in rank0)


class RankZeroHead(TinyClassifier):
    """A head only rank 0 uses: 'unused' is decided over all processes, so both keep the same scales."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = torch.nn.Linear(3, 3)

    def forward(self, inputs):
        logits = self.net(inputs)
        return self.head(logits) if self.global_rank == 0 else logits


class SaveScales(pl.Callback):
    def __init__(self, gradinit, directory):
        self.gradinit, self.directory = gradinit, directory

    def on_train_start(self, trainer, pl_module):
        save_rank_state(trainer, self.directory, self.gradinit.scales)


@pytest.mark.ddp
def test_a_parameter_used_on_one_rank_only_gets_the_same_scale_everywhere(tmp_path):
    pl.seed_everything(0)
    gradinit = GradInit(iterations=6, lr=0.05)
    trainer = tiny_trainer(
        None,
        strategy="ddp_fork_find_unused_parameters_true",
        devices=2,
        max_steps=1,
        callbacks=[gradinit, SaveScales(gradinit, str(tmp_path))],
    )
    trainer.fit(RankZeroHead(num_samples=96))
    states = rank_states(tmp_path)
    assert_ranks_agree(states)
    rank0 = states[0]
    assert rank0["head.weight"] != 1.0
