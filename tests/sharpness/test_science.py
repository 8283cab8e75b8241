"""Cohen et al. (2021, 2022) reproduced through the Trainer: training sits at the edge of stability."""

import statistics

import pytest
import pytorch_lightning as pl

from lightning_nt import SharpnessMonitor
from lightning_nt.demos import FullBatchMLP
from tests.helpers import tiny_trainer


def _ratios(optimizer, lr, steps, seed):
    pl.seed_everything(seed)
    monitor = SharpnessMonitor(max_overhead=None, every_n_steps=20, num_examples=500, max_iter=20)
    trainer = tiny_trainer(None, max_epochs=1, callbacks=[monitor])
    trainer.fit(FullBatchMLP(optimizer, lr, steps, seed))
    key = "sharpness/preconditioned" if optimizer == "adam" else "sharpness/lambda_max"
    return [(e["step"], e[key] / e["sharpness/threshold"]) for e in monitor.history if key in e]


@pytest.mark.slow
@pytest.mark.parametrize(("lr", "seed"), [(0.4, 0), (0.3, 1)])
def test_gradient_descent_sharpens_to_two_over_lr_and_hovers_there(lr, seed):
    ratios = _ratios("sgd", lr, 800, seed)
    assert ratios[0][1] < 0.6  # starts well below 2/lr
    crossing = next(step for step, ratio in ratios if ratio > 1.0)
    assert 100 <= crossing <= 500  # progressive sharpening reaches the threshold
    settled = [ratio for step, ratio in ratios if step >= crossing + 100]
    assert len(settled) >= 10
    assert min(settled) > 0.85 and max(settled) < 1.45  # and stays at the edge instead of growing on
    assert 0.95 < statistics.median(settled) < 1.15


@pytest.mark.slow
def test_adam_preconditioned_sharpness_reaches_38_over_lr():
    ratios = _ratios("adam", 1e-3, 1500, 0)
    assert ratios[0][1] < 0.2
    crossing = next(step for step, ratio in ratios if ratio > 0.98)
    assert crossing <= 1000
    settled = [ratio for step, ratio in ratios if step >= crossing + 100]
    assert min(settled) > 0.85 and max(settled) < 1.1
