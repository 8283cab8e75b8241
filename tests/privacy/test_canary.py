"""The canary harness (tests/privacy/canary.py) over every release channel and every clipping engine."""

from __future__ import annotations

import warnings

import pytest
import torch.nn.functional as F

from lightning_nt import DPStrategy
from tests.privacy.canary import (
    SAMPLING_SEED,
    Audited,
    assert_only_the_noisy_update_differs,
    first_batch_indices,
    releases_of,
)

C = 0.5


class PerExampleLosses(Audited):
    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels, reduction="none")


def _strategy(**kwargs):
    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the seed warning: both runs must draw the same batches
            return DPStrategy(noise_multiplier=1.0, max_grad_norm=C, seed=SAMPLING_SEED, **kwargs)

    return make


@pytest.mark.parametrize(
    ("kwargs", "module"),
    [
        ({}, Audited),
        ({"grad_sample_mode": "functorch"}, Audited),
        ({"grad_sample_mode": "ghost"}, PerExampleLosses),
        ({"max_physical_batch_size": 5}, Audited),
    ],
    ids=["hooks", "functorch", "ghost", "virtual-steps"],
)
def test_only_the_noisy_update_depends_on_a_canary(tmp_path, kwargs, module):
    make = _strategy(**kwargs)
    batch = first_batch_indices(make, module)
    assert len(batch) > 5
    without = releases_of(make, None, tmp_path, module=module, max_steps=1)
    canary = releases_of(make, batch[0], tmp_path, module=module, max_steps=1)
    moved = sum((canary.weights[n] - without.weights[n]).norm() for n in without.weights)
    assert moved > 0  # the canary was in the batch and acted through the update
    assert_only_the_noisy_update_differs(without, canary, C, expected_batch=16.0)
