import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_nt import SharpnessMonitor
from lightning_nt.sharpness.hvp import flatten, unflatten
from tests.helpers import (
    SaveHistory,
    TinyClassifier,
    assert_ranks_agree,
    rank_states,
    save_rank_state,
    tiny_trainer,
)


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


class SaveStep(pl.Callback):
    """At step 2 (measured): this rank's probe examples, the weights and the history."""

    def __init__(self, monitor, directory):
        self.monitor, self.directory = monitor, str(directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            state = {"probe": self.monitor._probe.tensors(), "weights": pl_module.state_dict()}
            save_rank_state(trainer, self.directory, {**state, "history": list(self.monitor.history)})


def _union_batch_sharpness(module, probes, size, count):
    """Exact fp64 ``mean_j g^T H g / ||g||^2`` over mini-batches j, each every rank's j-th local one together."""
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().double() for p in module.parameters()]
    module.double()
    values = []
    for j in range(count):
        rows = slice(j * size, (j + 1) * size)
        inputs = torch.cat([probe[0][rows] for probe in probes]).double()
        labels = torch.cat([probe[1][rows] for probe in probes])

        def loss_of(flat, inputs=inputs, labels=labels):
            logits = functional_call(module, dict(zip(names, unflatten(flat, params))), (inputs,))
            return F.cross_entropy(logits, labels)

        flat = flatten(params)
        gradient = torch.autograd.functional.jacobian(loss_of, flat)
        hessian = torch.autograd.functional.hessian(loss_of, flat)
        values.append(float(gradient @ hessian @ gradient / (gradient @ gradient)))
    return sum(values) / len(values)


@pytest.mark.ddp
def test_batch_sharpness_uses_the_mini_batch_of_a_step_across_ranks(tmp_path):
    """A DDP step averages every rank's local batch: each mini-batch is the union of the ranks' j-th local ones
    (before: each rank's own mini-batches, their figures averaged)."""
    pl.seed_everything(0)
    monitor = SharpnessMonitor(every_n_steps=2, num_examples=48, batch_sharpness=True, batch_sharpness_batches=2)
    trainer = tiny_trainer(
        None, strategy="ddp_fork", devices=2, max_epochs=1, callbacks=[monitor, SaveStep(monitor, tmp_path)]
    )
    trainer.fit(TinyClassifier(num_samples=96))
    saved = rank_states(tmp_path)
    module = TinyClassifier(num_samples=96)
    module.load_state_dict(saved[0]["weights"])
    expected = _union_batch_sharpness(module, [state["probe"] for state in saved], size=16, count=2)
    for state in saved:
        (measured,) = [entry for entry in state["history"] if entry["step"] == 2]
        assert measured["sharpness/batch_sharpness"] == pytest.approx(expected, rel=1e-4)
