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
    rank0, initial = _history_on_two_ranks(
        TinyClassifier(num_samples=96), 16, tmp_path, strategy="ddp_spawn", max_epochs=1
    )
    assert [entry["step"] for entry in rank0] == [0, 2]
    assert rank0[0]["gradtest/statistic"] == pytest.approx(_pooled_statistic(initial), rel=1e-5)


def _history_on_two_ranks(module, num_examples, folder, strategy="ddp_fork", **trainer_options):
    """GradientSignalTest's history in a 2-process fit (checked the same on both ranks), and the module before it."""
    pl.seed_everything(0)
    monitor = GradientSignalTest(every_n_steps=2, num_examples=num_examples)
    saved = SaveHistory(monitor, str(folder))
    trainer = tiny_trainer(None, strategy=strategy, devices=2, callbacks=[monitor, saved], **trainer_options)
    initial = copy.deepcopy(module)
    trainer.fit(module)
    states = rank_states(folder)
    assert_ranks_agree(states)
    return states[0], initial


class OddValidation(TinyClassifier):
    """33 validation examples: on 2 ranks the DistributedSampler pads rank 1's shard with example 0 (rank 0's)."""

    def val_dataloader(self):
        return torch.utils.data.DataLoader(classification_data(33, self.dim, self.classes, seed=1), batch_size=33)


@pytest.mark.ddp
def test_an_example_the_sampler_repeats_on_a_second_rank_is_tested_once(tmp_path):
    """Found by audit: the padded shard put example 0 in the probe of both ranks, possibly in one rank's first half
    and the other's second, which breaks the cross structure of the test's null."""
    rank0, initial = _history_on_two_ranks(OddValidation(num_samples=96), 64, tmp_path, max_steps=1)
    assert rank0[0]["gradtest/statistic"] == pytest.approx(_pooled_statistic(initial, size=33), rel=1e-5)


def _pooled_statistic(module, size=32):
    """The test at step 0 from explicit per-example gradients: each rank's validation examples (the
    DistributedSampler's shard r, r + 2, ..., each example once) split alike; direction from both second halves, f on
    both first."""
    inputs, labels = classification_data(size, 8, 3, seed=1).tensors
    module.eval()
    gradients = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(module.parameters()), retain_graph=True)])
            for loss in F.cross_entropy(module(inputs), labels, reduction="none")
        ]
    ).double()
    shards = [torch.arange(rank, size, 2) for rank in (0, 1)]
    halves = [(shard[first], shard[second]) for shard in shards for first, second in [split_indices(len(shard), 0)]]
    direction = gradients[torch.cat([second for _, second in halves])].mean(0)
    scores = gradients[torch.cat([first for first, _ in halves])] @ direction
    return float(len(scores) ** 0.5 * scores.mean() / scores.std())
