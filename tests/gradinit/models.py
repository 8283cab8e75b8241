"""Module shapes GradInit must handle: a shared block, tied weights, an unused parameter, warm-up, param groups."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import TinyClassifier


class SharedBlockClassifier(TinyClassifier):
    """ALBERT-style: one hidden block registered under two names and applied twice."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
        self.first, self.second = block, block
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), self.first, self.second, nn.Linear(16, 3))


class TiedLanguageModel(pl.LightningModule):
    """Embedding and output layer share one Parameter (``output.weight is embedding.weight``); next token = x + 1."""

    def __init__(self, vocab_size: int = 8, dim: int = 16, num_samples: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.hidden = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, vocab_size)
        self.output.weight = self.embedding.weight
        self.vocab_size, self.num_samples = vocab_size, num_samples

    def forward(self, tokens: Tensor) -> Tensor:
        return self.output(torch.tanh(self.hidden(self.embedding(tokens))))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, targets = batch
        return F.cross_entropy(self(tokens), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(self.vocab_size, (self.num_samples,), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens, (tokens + 1) % self.vocab_size), batch_size=16)


class UnusedParameterClassifier(TinyClassifier):
    """A registered head that ``forward`` never calls."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.unused_head = nn.Linear(16, 5)


class WarmupClassifier(TinyClassifier):
    """SGD at base lr 0.1 behind a linear warm-up that starts at lr 0."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, step / 10))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class ZeroLearningRateClassifier(TinyClassifier):
    """An optimizer at lr 0 with a schedule that sets no ``initial_lr`` (ReduceLROnPlateau doesn't)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.0)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss"}}


class ParamGroupsClassifier(TinyClassifier):
    """Two parameter groups with different learning rates."""

    def configure_optimizers(self):
        return torch.optim.SGD(
            [{"params": self.net[0].parameters(), "lr": 0.01}, {"params": self.net[3].parameters(), "lr": 0.1}]
        )
