import copy

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_nt.stats import GradientSignalTest, split_indices
from tests.helpers import (
    SaveHistory,
    TinyClassifier,
    assert_ranks_agree,
    classification_data,
    rank_states,
    tiny_trainer,
)


@pytest.mark.ddp
def test_all_ranks_report_the_same_test_of_the_pooled_examples(tmp_path):
    pl.seed_everything(0)
    monitor = GradientSignalTest(every_n_steps=2, num_examples=16)
    trainer = tiny_trainer(
        None, strategy="ddp_spawn", devices=2, max_epochs=1, callbacks=[monitor, SaveHistory(monitor, str(tmp_path))]
    )
    module = TinyClassifier(num_samples=96)
    initial = copy.deepcopy(module)
    trainer.fit(module)
    states = rank_states(tmp_path)
    assert_ranks_agree(states)
    rank0 = states[0]
    assert [entry["step"] for entry in rank0] == [0, 2]
    assert rank0[0]["gradtest/statistic"] == pytest.approx(_pooled_statistic(initial), rel=1e-5)


def _pooled_statistic(module):
    """The test at step 0 from explicit per-example gradients: each rank's 16 validation examples (the
    DistributedSampler's shard r, r + 2, ...) split alike; direction from both second halves, f on both first."""
    inputs, labels = classification_data(32, 8, 3, seed=1).tensors
    module.eval()
    gradients = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)])
            for loss in F.cross_entropy(module(inputs), labels, reduction="none")
        ]
    ).double()
    first, second = split_indices(16, seed=0)
    shards = [torch.arange(rank, 32, 2) for rank in (0, 1)]
    direction = gradients[torch.cat([shard[second] for shard in shards])].mean(0)
    scores = gradients[torch.cat([shard[first] for shard in shards])] @ direction
    return float(len(scores) ** 0.5 * scores.mean() / scores.std())
