"""Test-only modules and independent references for the sharpness tests."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lightning_nt.sharpness.hvp import flatten, unflatten
from tests.helpers import TinyClassifier


def exact_hessian(module: nn.Module, names: list[str], inputs: Tensor, labels: Tensor) -> Tensor:
    """``torch.autograd.functional.hessian`` of the mean cross-entropy w.r.t. the parameters ``names``, in fp64."""
    weights = dict(module.named_parameters())
    params = [weights[name].detach().double() for name in names]
    others = {name: value.detach().double() for name, value in weights.items() if name not in names}

    def loss_of(flat: Tensor) -> Tensor:
        substituted = {**others, **dict(zip(names, unflatten(flat, params)))}
        return F.cross_entropy(functional_call(module, substituted, (inputs.double(),)), labels)

    return torch.autograd.functional.hessian(loss_of, flatten(params))


def probe_examples(module: TinyClassifier, num_samples: int) -> tuple[Tensor, Tensor]:
    """The first ``num_samples`` training examples (the probe set of an unshuffled loader)."""
    inputs, labels = module.train_dataloader().dataset.tensors
    return inputs[:num_samples], labels[:num_samples]


class FrozenBackbone(TinyClassifier):
    """First layer frozen, an unused trainable parameter, and ``Adam(self.parameters())`` over all of it."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(shuffle=False, **kwargs)  # type: ignore[arg-type]
        self.net[0].requires_grad_(False)
        self.unused = nn.Parameter(torch.zeros(3))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class RecordAdam(pl.Callback):
    """After every optimizer step: the exact Hessian of the probe loss over the trained parameters and Adam's P."""

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self.hessians: dict[int, Tensor] = {}
        self.diagonals: dict[int, Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        optimizer = trainer.optimizers[0]
        named = [(n, p) for n, p in pl_module.named_parameters() if p in optimizer.state]
        beta1, beta2 = optimizer.param_groups[0]["betas"]
        eps = optimizer.param_groups[0]["eps"]
        pieces = []
        for _, p in named:  # P = (1 - b1^t)(sqrt(v / (1 - b2^t)) + eps), Cohen et al. (2022)
            state = optimizer.state[p]
            t = float(state["step"])
            pieces.append((1 - beta1**t) * ((state["exp_avg_sq"].double() / (1 - beta2**t)).sqrt() + eps))
        inputs, labels = probe_examples(pl_module, self.num_samples)
        step = trainer.global_step
        self.hessians[step] = exact_hessian(pl_module, [n for n, _ in named], inputs, labels)
        self.diagonals[step] = flatten(pieces)


class CrashAt(pl.Callback):
    """Raise at the first batch of epoch ``epoch``: a run that dies after its last epoch-end checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 1:
            raise RuntimeError("simulated crash")


class BagOfSigns(TinyClassifier):
    """``nn.EmbeddingBag`` over the signs of the inputs (token ``2 k + [x_k > 0]``): no second derivative in PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0] = nn.EmbeddingBag(2 * self.dim, self.net[0].out_features)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net((inputs > 0).long() + 2 * torch.arange(self.dim, device=inputs.device))
