"""Audit of the figures on module shapes: dropout in train mode over several probe chunks, sum-reduced losses."""

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt import SharpnessMonitor
from lightning_nt.sharpness.hvp import flatten, unflatten
from tests.helpers import tiny_trainer

INPUTS = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
LABELS = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))


class DropoutMLP(pl.LightningModule):
    """A tanh MLP with Dropout before its head, cross-entropy with a chosen reduction, an unshuffled loader."""

    def __init__(self, reduction: str = "mean", p: float = 0.5) -> None:
        super().__init__()
        self.hidden, self.dropout, self.head = nn.Linear(5, 6), nn.Dropout(p), nn.Linear(6, 3)
        self.reduction = reduction

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.dropout(torch.tanh(self.hidden(inputs))))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels, reduction=self.reduction)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(INPUTS, LABELS), batch_size=8)


def _hessian_with_masks(module: nn.Module, seeds: list[int], chunk: int) -> Tensor:
    """Exact Hessian (fp64) of the size-weighted mean of the chunks' train-mode losses, chunk ``c``'s dropout masks
    drawn from ``torch.manual_seed(seeds[c])``: the operator of one measurement with fixed masks."""
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().double() for p in module.parameters()]
    module.double().train()

    def loss_of(flat: Tensor) -> Tensor:
        weights = dict(zip(names, unflatten(flat, params)))
        total = flat.new_zeros(())
        for index, seed in enumerate(seeds):
            torch.manual_seed(seed)
            rows = slice(index * chunk, (index + 1) * chunk)
            logits = functional_call(module, weights, (INPUTS[rows].double(),))
            total = total + chunk / len(INPUTS) * F.cross_entropy(logits, LABELS[rows])
        return total

    return torch.autograd.functional.hessian(loss_of, flatten(params))


def test_dropout_in_train_mode_over_several_chunks_measures_one_fixed_operator():
    """Before: every Hessian-vector product ran new forwards and drew new dropout masks, so with ``chunk_size`` below
    ``num_examples`` Lanczos ran on a different random matrix at each step and reported none of their spectra."""
    torch.manual_seed(0)
    module = DropoutMLP()
    start = DropoutMLP()
    start.load_state_dict(module.state_dict())
    monitor = SharpnessMonitor(every_n_steps=1000, num_examples=32, chunk_size=8, tol=1e-8, max_iter=60, seed=3)
    tiny_trainer(callbacks=[monitor], max_steps=1).fit(module)
    base = 3 * 1_000_003  # the measurement's seed: seed * 1_000_003 + global step (0)
    eigenvalues = torch.linalg.eigvalsh(_hessian_with_masks(start, [base + c for c in range(4)], chunk=8))
    measured = monitor.history[0]
    assert abs(measured["sharpness/lambda_max"] - float(eigenvalues[-1])) <= 1e-4 * float(eigenvalues[-1])
    assert abs(measured["sharpness/lambda_min"] - float(eigenvalues[0])) <= 1e-3 * float(eigenvalues[-1])


def _sum_warnings(module: pl.LightningModule, **options: object) -> list[str]:
    monitor = SharpnessMonitor(every_n_steps=1000, num_examples=32, **options)  # type: ignore[arg-type]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(callbacks=[monitor], max_steps=1).fit(module)
    return [str(w.message) for w in caught if "is a sum over the batch" in str(w.message)]


def test_a_sum_reduced_loss_is_named_with_the_fix():
    """Before: silent. The probe set's Hessian of a sum over 32 examples is 4x a training batch's (8), and
    ``chunk_size=8`` divides it by 4: the ratio to 2/lr meant nothing, with no word said."""
    torch.manual_seed(0)
    (message,) = _sum_warnings(DropoutMLP(reduction="sum", p=0.0), chunk_size=8)
    assert "reduction='mean'" in message and "loss_fn" in message
    torch.manual_seed(0)
    assert _sum_warnings(DropoutMLP(reduction="mean", p=0.5)) == []


def _batch_sharpness_reference(module: nn.Module, size: int) -> float:
    """``mean over consecutive mini-batches B of g_B^T H_B g_B / ||g_B||^2`` from exact fp64 Hessians (eval mode)."""
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().double() for p in module.parameters()]
    module.double().eval()
    values = []
    for start in range(0, len(INPUTS), size):
        rows = slice(start, start + size)

        def loss_of(flat: Tensor, rows: slice = rows) -> Tensor:
            logits = functional_call(module, dict(zip(names, unflatten(flat, params))), (INPUTS[rows].double(),))
            return F.cross_entropy(logits, LABELS[rows])

        flat = flatten(params)
        gradient = torch.autograd.functional.jacobian(loss_of, flat)
        hessian = torch.autograd.functional.hessian(loss_of, flat)
        values.append(float(gradient @ hessian @ gradient / (gradient @ gradient)))
    return sum(values) / len(values)


def test_batch_sharpness_with_gradient_accumulation_uses_the_examples_of_one_optimizer_step():
    """Before: mini-batches of the loader's size (8), though each SGD step averages 2 x 8 examples."""
    torch.manual_seed(0)
    module = DropoutMLP(p=0.0)
    start = DropoutMLP(p=0.0)
    start.load_state_dict(module.state_dict())
    monitor = SharpnessMonitor(every_n_steps=1000, num_examples=32, mode="eval", batch_sharpness=True)
    tiny_trainer(callbacks=[monitor], max_steps=1, accumulate_grad_batches=2).fit(module)
    expected = _batch_sharpness_reference(start, size=16)
    assert abs(monitor.history[0]["sharpness/batch_sharpness"] - expected) <= 1e-5 * expected


def _eval_hessian(module: nn.Module) -> tuple[list[str], list[Tensor], Tensor]:
    """The parameters' names, their fp64 values and the exact fp64 Hessian of the mean cross-entropy on all
    ``INPUTS`` in eval mode (``module`` is left in fp64)."""
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().double() for p in module.parameters()]
    module.double().eval()

    def loss_of(flat: Tensor) -> Tensor:
        logits = functional_call(module, dict(zip(names, unflatten(flat, params))), (INPUTS.double(),))
        return F.cross_entropy(logits, LABELS)

    return names, params, torch.autograd.functional.hessian(loss_of, flatten(params))


class TwoLearningRates(DropoutMLP):
    """SGD with the hidden layer at lr 0.1 (group 0) and the head at lr 0.02."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = [{"params": self.hidden.parameters(), "lr": 0.1}, {"params": self.head.parameters(), "lr": 0.02}]
        return torch.optim.SGD(groups)


def test_param_groups_with_different_learning_rates_compare_the_lr_scaled_sharpness_with_group_0s_threshold():
    """Before: lambda_max(H) against 2/lr_0, though the head steps at a fifth of lr_0: gradient descent with per-group
    rates R lr_0 is stable while lambda_max(R^1/2 H R^1/2) < 2/lr_0, so the ratio overstated the instability."""
    torch.manual_seed(0)
    module = TwoLearningRates(p=0.0)
    start = TwoLearningRates(p=0.0)
    start.load_state_dict(module.state_dict())
    monitor = SharpnessMonitor(
        every_n_steps=1000, num_examples=32, mode="eval", tol=1e-8, max_iter=60, lambda_min=False
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "SharpnessMonitor: the optimizer's param groups")
        tiny_trainer(callbacks=[monitor], max_steps=1).fit(module)
    names, params, hessian = _eval_hessian(start)
    root = torch.cat(
        [torch.full((p.numel(),), 1.0 if name.startswith("hidden") else 0.2**0.5) for name, p in zip(names, params)]
    )
    expected = float(torch.linalg.eigvalsh(root[:, None] * hessian * root[None, :])[-1])
    measured = monitor.history[0]
    assert measured["sharpness/threshold"] == 20.0
    assert abs(measured["sharpness/lr_scaled"] - expected) <= 1e-4 * expected
    assert abs(measured["sharpness/ratio"] - expected / 20.0) <= 1e-4 * expected / 20.0
    assert measured["sharpness/lambda_max"] > 1.1 * expected  # the unscaled figure it replaces, far off here


def test_a_loss_that_needs_its_whole_batch_is_measured_without_a_verdict_on_its_reduction():
    def whole_batches_only(module: pl.LightningModule, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, labels = batch
        if len(inputs) != 32:
            raise ValueError("this loss compares all 32 examples with each other")
        return F.cross_entropy(module(inputs), labels)

    torch.manual_seed(0)
    monitor = SharpnessMonitor(every_n_steps=1000, num_examples=32, loss_fn=whole_batches_only)
    tiny_trainer(callbacks=[monitor], max_steps=1).fit(DropoutMLP(p=0.0))
    assert monitor.history[0]["sharpness/lambda_max"] > 0


class StepWeights(pl.Callback):
    """The micro-batches of the first optimizer step, and the weights after it."""

    def __init__(self) -> None:
        self.batches: list[tuple[Tensor, Tensor]] = []
        self.weights: dict[str, Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 0 or not self.weights:
            self.batches.append(batch)
        if trainer.global_step == 1 and not self.weights:
            self.weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}


def test_batch_data_with_gradient_accumulation_measures_every_micro_batch_of_the_step():
    """Before: the Hessian of the step's last micro-batch only, though SGD steps on the mean of both."""
    torch.manual_seed(0)
    module = DropoutMLP(p=0.0)
    monitor = SharpnessMonitor(every_n_steps=1, data="batch", mode="eval", num_eigenvalues=2)
    recorder = StepWeights()
    tiny_trainer(callbacks=[monitor, recorder], max_steps=1, accumulate_grad_batches=2).fit(module)
    assert [entry["step"] for entry in monitor.history] == [1] and len(recorder.batches) == 2
    module.load_state_dict(recorder.weights)
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().double() for p in module.parameters()]
    module.double().eval()

    def loss_of(flat: Tensor) -> Tensor:
        weights = dict(zip(names, unflatten(flat, params)))
        losses = [F.cross_entropy(functional_call(module, weights, (x.double(),)), y) for x, y in recorder.batches]
        return sum(losses) / 2

    expected = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flatten(params))).flip(0)
    got = [monitor.history[0]["sharpness/lambda_max"], monitor.history[0]["sharpness/lambda_2"]]
    assert got == pytest.approx(expected[:2].tolist(), rel=1e-4)


class GroupDecays(DropoutMLP):
    """SGD with the hidden layer in group 0 and the head in group 1, each with its own lr and weight decay."""

    def __init__(self, lrs: tuple[float, float], decays: tuple[float, float]) -> None:
        super().__init__(p=0.0)
        self.lrs, self.decays = lrs, decays

    def configure_optimizers(self) -> torch.optim.Optimizer:
        layers = (self.hidden, self.head)
        return torch.optim.SGD(
            [
                {"params": layer.parameters(), "lr": lr, "weight_decay": decay}
                for layer, lr, decay in zip(layers, self.lrs, self.decays)
            ]
        )


@pytest.mark.parametrize(("lrs", "decays"), [((0.1, 0.1), (0.5, 0.0)), ((0.1, 0.02), (0.5, 2.0))])
def test_param_groups_with_different_weight_decays_are_compared_exactly(lrs, decays):
    """Before: group 0's decay subtracted from the threshold, as if every parameter had it. The reference is the
    SGD step's own Jacobian on the loss, ``I - lr_0 R (H + D)``: the step is stable while its smallest eigenvalue stays
    above -1, i.e. ``1 - lr_0 (lr_scaled + d_0) > -1``, ``lr_scaled < threshold``."""
    torch.manual_seed(0)
    module = GroupDecays(lrs, decays)
    start = GroupDecays(lrs, decays)
    start.load_state_dict(module.state_dict())
    monitor = SharpnessMonitor(every_n_steps=1000, num_examples=32, mode="eval", tol=1e-8, max_iter=60)
    with pytest.warns(UserWarning, match="different weight_decay"):
        tiny_trainer(callbacks=[monitor], max_steps=1).fit(module)
    names, params, hessian = _eval_hessian(start)
    group = [0 if name.startswith("hidden") else 1 for name, p in zip(names, params) for _ in range(p.numel())]
    rates = torch.tensor([lrs[g] for g in group], dtype=torch.float64)
    decay = torch.tensor([decays[g] for g in group], dtype=torch.float64)
    jacobian = torch.eye(len(group), dtype=torch.float64) - rates[:, None] * (hessian + torch.diag(decay))
    lowest = float(torch.linalg.eigvals(jacobian).real.min())
    measured = monitor.history[0]
    assert measured["sharpness/threshold"] == pytest.approx(2 / lrs[0] - decays[0])
    assert 1 - lrs[0] * (measured["sharpness/lr_scaled"] + decays[0]) == pytest.approx(lowest, abs=1e-5)
    assert measured["sharpness/ratio"] == pytest.approx(
        measured["sharpness/lr_scaled"] / measured["sharpness/threshold"]
    )
