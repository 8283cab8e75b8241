"""The gradient signal test through the Trainer: signal early in training, and its level under a planted null."""

import logging
import statistics

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from scipy.stats import binom, kstest
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt.demos import DigitsDataModule, DigitsMLP
from lightning_nt.stats import GradientSignalTest
from tests.helpers import tiny_trainer


@pytest.mark.slow
def test_on_the_digits_the_test_rejects_early_and_the_statistic_falls_as_training_converges():
    pl.seed_everything(0)
    monitor = GradientSignalTest(every_n_steps=20, num_examples=512)  # the whole validation set: 359 digits
    trainer = tiny_trainer(None, callbacks=[monitor], max_epochs=10, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(DigitsMLP(optimizer="sgd", lr=0.01, momentum=0.9), DigitsDataModule(batch_size=64))
    history = monitor.history
    assert [entry["step"] for entry in history] == list(range(0, 230, 20))
    early = [entry for entry in history if entry["step"] <= 60]
    assert all(entry["gradtest/p_value"] < 1e-6 and entry["gradtest/reject"] == 1.0 for entry in early)
    first = statistics.median(entry["gradtest/statistic"] for entry in history[:4])
    last = statistics.median(entry["gradtest/statistic"] for entry in history[-4:])
    assert last < 0.5 * first  # measured: 5.9 -> 2.0
    signal_first = statistics.median(entry["gradtest/signal"] for entry in history[:4])
    signal_last = statistics.median(entry["gradtest/signal"] for entry in history[-4:])
    assert signal_last < 0.5 * signal_first  # measured: 0.24 -> 0.067


DIM, SAMPLES = 20, 400


class PlantedLogistic(pl.LightningModule):
    """Logistic regression whose weights are those that generated its data: the population gradient is zero."""

    def __init__(self, seed: int, offset: float = 0.0) -> None:
        super().__init__()
        truth = torch.randn(DIM, generator=torch.Generator().manual_seed(1234)) * 2 / DIM**0.5
        self.linear = nn.Linear(DIM, 1)
        with torch.no_grad():
            self.linear.weight.copy_(truth[None] + offset)
            self.linear.bias.fill_(0.5)
        generator = torch.Generator().manual_seed(seed)

        def draw() -> TensorDataset:
            inputs = torch.randn(SAMPLES, DIM, generator=generator)
            return TensorDataset(inputs, torch.bernoulli(torch.sigmoid(inputs @ truth + 0.5), generator=generator))

        self.train_set, self.val_set = draw(), draw()

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return F.binary_cross_entropy_with_logits(self.linear(inputs).squeeze(1), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=100)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=SAMPLES)


def _p_value(seed, offset=0.0):
    monitor = GradientSignalTest(num_examples=SAMPLES, every_n_steps=1000)
    trainer = tiny_trainer(None, callbacks=[monitor], max_steps=1, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(PlantedLogistic(seed, offset))
    return monitor.history[0]["gradtest/p_value"]


@pytest.fixture
def quiet_lightning():
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader` but have no `validation_step`")
def test_a_planted_null_through_the_trainer_is_rejected_at_the_nominal_rate(quiet_lightning):
    reps = 400  # the binomial 99% interval for 5% of 400 is 11-30 rejections (2.8%-7.5%)
    p_values = [_p_value(seed) for seed in range(reps)]
    low, high = binom.interval(0.99, reps, 0.05)
    assert low <= sum(p <= 0.05 for p in p_values) <= high
    assert kstest(p_values, "uniform").pvalue > 0.01
    moved = [_p_value(seed, offset=0.3) for seed in range(20)]  # weights moved away from the truth
    assert max(moved) < 0.01  # measured: at most 0.0012
