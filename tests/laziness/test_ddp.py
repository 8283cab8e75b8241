import copy
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt.laziness import LazinessMonitor
from tests.helpers import SaveHistory, assert_ranks_agree, rank_states, save_rank_state, tiny_trainer
from tests.laziness.models import PlainClassifier, ReLUClassifier
from tests.laziness.test_core import _numpy_alignment, _reference_ntk


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


class OneClassOnRankZero(PlainClassifier):
    """64 unshuffled examples, all of class 0 but examples 3 and 21: the DistributedSampler deals the even indices to
    rank 0, whose probe set (its first 8) holds one class, and the odd ones to rank 1 (3 and 21 among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def train_dataloader(self):
        inputs = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
        labels = torch.zeros(64, dtype=torch.long)
        labels[[3, 21]] = 1
        return DataLoader(TensorDataset(inputs, labels), batch_size=8, shuffle=False)


class OwnMeasurement(pl.Callback):
    """Each rank's own values at the end, on its own probe set: autograd Jacobians and NumPy, not the monitor's code."""

    def __init__(self, monitor: LazinessMonitor, directory: str) -> None:
        self.monitor, self.directory = monitor, directory

    def on_train_start(self, trainer, pl_module):
        self.initial = copy.deepcopy(pl_module.net).double()

    def on_train_end(self, trainer, pl_module):
        inputs, labels = (tensor.double() for tensor in self.monitor._initial["batch"])
        kernel0 = _reference_ntk(self.initial.eval(), inputs).numpy()
        kernel = _reference_ntk(copy.deepcopy(pl_module.net).double().eval(), inputs).numpy()
        moved = [(p.double() - q).square().sum() for p, q in zip(pl_module.net.parameters(), self.initial.parameters())]
        size = sum(q.square().sum() for q in self.initial.parameters())
        onehot = np.eye(2)[labels.long().numpy()]
        own = {
            "laziness/weight_distance": float(sum(moved).sqrt() / size.sqrt()),
            "laziness/ntk_change": float(np.linalg.norm(kernel - kernel0) / np.linalg.norm(kernel0)),
            "laziness/ntk_lambda_max": float(np.linalg.eigvalsh(kernel)[-1]),
        }
        if len(set(labels.tolist())) > 1:  # else undefined on this rank
            own["laziness/kernel_alignment"] = _numpy_alignment(kernel, onehot)
        save_rank_state(trainer, self.directory, {"own": own, "history": self.monitor.history})


@pytest.mark.ddp
def test_a_rank_whose_probe_set_holds_one_class_logs_the_mean_of_the_ranks_that_measured(tmp_path):
    """Rank 0's alignment is undefined (one class), rank 1's is not: the ranks' values hold different keys. They
    crashed the fit (gloo: a size mismatch; NCCL: a hang); every rank now logs the same keys, each the mean of the
    ranks' own measurements (the alignment: rank 1's)."""
    monitor = LazinessMonitor(every_n_steps=2, num_examples=8)
    own = OwnMeasurement(monitor, str(tmp_path))
    trainer = tiny_trainer(None, strategy="ddp_fork", devices=2, max_steps=4, callbacks=[monitor, own])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(OneClassOnRankZero())
    states = rank_states(tmp_path)
    assert_ranks_agree([state["history"] for state in states], ignore={"laziness/seconds"})
    assert [entry["step"] for entry in states[0]["history"]] == [0, 2, 4]
    assert "laziness/kernel_alignment" not in states[0]["own"] and "laziness/kernel_alignment" in states[1]["own"]
    logged = states[0]["history"][-1]
    for tag in states[1]["own"]:
        values = [state["own"][tag] for state in states if tag in state["own"]]
        assert logged[tag] == pytest.approx(sum(values) / len(values), rel=1e-5), tag
    assert states[0]["own"]["laziness/ntk_change"] != pytest.approx(states[1]["own"]["laziness/ntk_change"], rel=1e-3)
