"""A small image-classification task that needs no download: scikit-learn's 8x8 handwritten digits.

1797 grey-scale images in 10 classes ship inside scikit-learn, so examples and tests can train a
real convolutional network on the CPU in seconds. Needs the ``examples`` or ``test`` extra
(``pip install "lightning-nt[examples]"``) for scikit-learn.
"""

from __future__ import annotations

from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_nt.common.validation import check_choice
from lightning_nt.demos.edge_of_stability import half_mean_squared_error

__all__ = ["DigitsCNN", "DigitsClassifier", "DigitsDataModule", "DigitsMLP", "load_digits_tensors"]

Norm = Literal["none", "batch", "group"]
OptimizerName = Literal["sgd", "adam", "adamw"]
LossName = Literal["cross_entropy", "mse"]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """The digits as float images of shape ``[1797, 1, 8, 8]`` in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError('The digits data ship with scikit-learn: pip install "lightning-nt[examples]"') from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.int64)


class DigitsDataModule(pl.LightningDataModule):
    """Train/validation split of the digits; the validation set doubles as the test set.

    Args:
        batch_size: examples per training batch.
        val_fraction: share of the 1797 images held out for validation.
        train_size: keep only this many training images (``None``: all), e.g. for fast tests.
        seed: seed of the split (the split never depends on the global RNG).

    Examples:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> len(dm.train_set), len(dm.val_set)
        (1438, 359)
    """

    def __init__(
        self, batch_size: int = 64, val_fraction: float = 0.2, train_size: int | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction}.")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.train_size = train_size
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        images, labels = load_digits_tensors()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
        num_val = round(self.val_fraction * len(labels))
        train_index = order[num_val:][: self.train_size]
        self.train_set = TensorDataset(images[train_index], labels[train_index])
        self.val_set = TensorDataset(images[order[:num_val]], labels[order[:num_val]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class DigitsClassifier(pl.LightningModule):
    """What the digits models share: cross-entropy training, ``train/*``, ``val/*`` and ``test/*`` logging, and
    the optimizer named by the hyperparameters ``optimizer``, ``lr``, ``momentum`` and ``weight_decay``.

    The loss is the hyperparameter ``loss``: ``"cross_entropy"``, or ``"mse"``, Cohen et al.'s squared error to
    one-hot targets (:func:`half_mean_squared_error`), under which full-batch gradient descent shows the edge of
    stability most cleanly (with cross-entropy the sharpness falls as the digits are fitted)."""

    def __init__(self) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = self._loss(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log(f"{stage}/loss", self._loss(logits, labels), prog_bar=True)
        self.log(f"{stage}/acc", self.val_acc, prog_bar=True)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.hparams.get("loss", "cross_entropy") == "mse":
            return half_mean_squared_error(logits, F.one_hot(labels, 10).to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        optimizer_class = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        return optimizer_class(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


class DigitsCNN(DigitsClassifier):
    """A three-layer CNN for the 8x8 digits, with a choice of normalisation and optimizer.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (and ``test/*``).

    Args:
        width: channels of the first convolution (the second and third have twice as many).
        norm: ``"none"``, ``"batch"`` (BatchNorm) or ``"group"`` (GroupNorm, DP-compatible).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: decoupled for AdamW, L2 for the others.
        depth: convolutions (>= 3); deep networks without normalisation are hard to train from the default
            initialisation, which is what GradInit repairs.
        loss: ``"cross_entropy"`` or ``"mse"`` (squared error to one-hot targets, Cohen et al.'s).

    Examples:
        >>> DigitsCNN(width=8)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        width: int = 16,
        norm: Norm = "none",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        depth: int = 3,
        loss: LossName = "cross_entropy",
    ) -> None:
        super().__init__()
        if depth < 3:
            raise ValueError(f"`depth` must be >= 3, got {depth}.")
        check_choice("optimizer", optimizer, ("sgd", "adam", "adamw"))
        check_choice("loss", loss, ("cross_entropy", "mse"))
        self.save_hyperparameters()
        self.features = nn.Sequential(
            *_conv_block(1, width, norm),
            *_conv_block(width, 2 * width, norm),
            nn.MaxPool2d(2),
            *[layer for _ in range(depth - 2) for layer in _conv_block(2 * width, 2 * width, norm)],
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))


class DigitsMLP(DigitsClassifier):
    """A one-hidden-layer ReLU network on the flattened 8x8 digits (the two-layer net of norm-based capacity measures).

    Args:
        hidden: width of the hidden layer.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: decoupled for AdamW, L2 for the others.
        loss: ``"cross_entropy"`` or ``"mse"`` (squared error to one-hot targets, Cohen et al.'s).

    Examples:
        >>> DigitsMLP(hidden=32)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        hidden: int = 512,
        optimizer: OptimizerName = "adam",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        loss: LossName = "cross_entropy",
    ) -> None:
        super().__init__()
        check_choice("optimizer", optimizer, ("sgd", "adam", "adamw"))
        check_choice("loss", loss, ("cross_entropy", "mse"))
        self.save_hyperparameters()
        self.network = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)


def _conv_block(in_channels: int, out_channels: int, norm: Norm) -> list[nn.Module]:
    normalisation = {
        "none": nn.Identity,
        "batch": lambda: nn.BatchNorm2d(out_channels),
        "group": lambda: nn.GroupNorm(min(8, out_channels), out_channels),
    }
    check_choice("norm", norm, normalisation)
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), normalisation[norm](), nn.ReLU()]
