"""Tiny LightningModules in the styles users write them, for attaching capabilities to."""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.demos.boring_classes import BoringModel
from pytorch_lightning.demos.transformer import Transformer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "BoringModel",
    "DictLossClassifier",
    "ManualOptimizationModule",
    "TinyClassifier",
    "TinyTransformer",
    "classification_data",
]


def classification_data(num_samples: int = 64, dim: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Linearly separable-ish Gaussian blobs, generated from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (num_samples,), generator=generator)
    centres = torch.randn(classes, dim, generator=generator) * 2
    inputs = centres[labels] + torch.randn(num_samples, dim, generator=generator)
    return TensorDataset(inputs, labels)


class TinyClassifier(pl.LightningModule):
    """An MLP whose ``training_step`` returns a Tensor and logs a loss and a torchmetrics accuracy."""

    def __init__(
        self,
        dim: int = 8,
        hidden: int = 16,
        classes: int = 3,
        norm: Literal["none", "batch", "group"] = "none",
        lr: float = 0.1,
        batch_size: int = 16,
        num_samples: int = 64,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        normalisation = {
            "none": nn.Identity,
            "batch": lambda: nn.BatchNorm1d(hidden),
            "group": lambda: nn.GroupNorm(4, hidden),
        }
        self.net = nn.Sequential(nn.Linear(dim, hidden), normalisation[norm](), nn.Tanh(), nn.Linear(hidden, classes))
        self.accuracy = MulticlassAccuracy(num_classes=classes, average="micro")
        self.lr, self.batch_size, self.num_samples, self.dim, self.classes = lr, batch_size, num_samples, dim, classes
        self.shuffle = shuffle

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, labels)
        self.accuracy(logits, labels)
        self.log("train_loss", loss)
        self.log("train_acc", self.accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        self.log("val_loss", F.cross_entropy(self(inputs), labels))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        self.log("test_loss", F.cross_entropy(self(inputs), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def train_dataloader(self) -> DataLoader:
        data = classification_data(self.num_samples, self.dim, self.classes)
        return DataLoader(data, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(classification_data(32, self.dim, self.classes, seed=1), batch_size=32)


class DictLossClassifier(TinyClassifier):
    """Same network, but ``training_step(batch)`` (no ``batch_idx``) returns a dict and uses ``log_dict``."""

    def training_step(self, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:  # type: ignore[override]
        inputs, labels = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, labels)
        self.accuracy.update(logits, labels)
        self.log_dict({"train_loss": loss})
        return {"loss": loss, "logits": logits.detach()}


class ManualOptimizationModule(TinyClassifier):
    """Steps its optimizer itself, so its loss can't be read from ``training_step``."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.automatic_optimization = False

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:  # type: ignore[override]
        optimizer = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


class TinyTransformer(pl.LightningModule):
    """Lightning's demo encoder-decoder ``Transformer`` on random token sequences (vocabulary 16)."""

    def __init__(self, vocab_size: int = 16, length: int = 6, num_samples: int = 32) -> None:
        super().__init__()
        self.model = Transformer(vocab_size=vocab_size, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.1)
        self.vocab_size, self.length, self.num_samples = vocab_size, length, num_samples

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, target = batch
        return F.nll_loss(self.model(inputs, target), target.view(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(self.vocab_size, (self.num_samples, self.length + 1), generator=generator)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
