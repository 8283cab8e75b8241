"""Cohen et al.'s edge-of-stability setting, small: full-batch training of a tanh MLP with MSE on 500 examples.

Under full-batch gradient descent at learning rate ``lr`` the top Hessian eigenvalue rises to ``2/lr`` and
hovers there (about 2.5 s on a 2-core CPU for 800 steps); under full-batch Adam the preconditioned
sharpness rises to ``38/lr``. Used by ``examples/edge_of_stability.py`` and the tests.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["FullBatch", "FullBatchMLP", "half_mean_squared_error"]


def half_mean_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """``sum((outputs - targets)^2) / (2 n)``: Cohen et al.'s MSE, summed over classes, averaged over examples."""
    return F.mse_loss(outputs, targets, reduction="sum") / (2 * len(targets))


class FullBatch(Dataset):
    """Every item is the whole data set: one optimizer step per item is full-batch gradient descent."""

    def __init__(self, inputs: Tensor, targets: Tensor, steps: int) -> None:
        self.inputs, self.targets, self.steps = inputs, targets, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs, self.targets


class FullBatchMLP(pl.LightningModule):
    """tanh MLP 32-100-100-10 with MSE to one-hot targets of 10 random classes, trained full batch.

    Args:
        optimizer: ``"sgd"`` (plain gradient descent) or ``"adam"``.
        lr: learning rate.
        steps: optimizer steps in the one epoch.
        seed: seed of the data (the weights follow the global seed).

    Examples:
        >>> FullBatchMLP(steps=3).train_dataloader().dataset[0][0].shape
        torch.Size([500, 32])
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 0.4, steps: int = 600, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.inputs = torch.randn(500, 32, generator=generator)
        self.targets = F.one_hot(torch.randint(10, (500,), generator=generator), 10).float()
        self.net = nn.Sequential(nn.Linear(32, 100), nn.Tanh(), nn.Linear(100, 100), nn.Tanh(), nn.Linear(100, 10))
        self.optimizer, self.lr, self.steps = optimizer, lr, steps

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = half_mean_squared_error(self.net(inputs), targets)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(FullBatch(self.inputs, self.targets, self.steps), batch_size=None)
