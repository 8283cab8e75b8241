"""A ReLU classifier that takes tuple, dict or dataclass batches, for attaching the LazinessMonitor to."""

from dataclasses import dataclass
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from tests.helpers import classification_data


@dataclass
class Example:
    features: Tensor
    label: Tensor


class _Styled(Dataset):
    def __init__(self, style: str, num_samples: int) -> None:
        self.data, self.style = classification_data(num_samples, dim=8, classes=3), style

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        x, y = self.data[index]
        return {"tuple": (x, y), "dict": {"x": x, "y": y}, "dataclass": Example(x, y)}[self.style]


def _collate_dataclass(items: list[Example]) -> Example:
    return Example(torch.stack([i.features for i in items]), torch.stack([i.label for i in items]))


def inputs_of(batch):
    if isinstance(batch, dict):
        return batch["x"]
    return batch.features if isinstance(batch, Example) else batch[0]


def labels_of(batch):
    if isinstance(batch, dict):
        return batch["y"]
    return batch.label if isinstance(batch, Example) else batch[1]


class PlainClassifier(pl.LightningModule):
    """``self.net`` (set by a subclass, with its data) trained with cross-entropy by plain SGD at lr 0.1."""

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ReLUClassifier(pl.LightningModule):
    """``Linear -> [BatchNorm] -> ReLU -> [Dropout] -> Linear -> ReLU -> Linear`` trained by SGD with momentum."""

    def __init__(
        self,
        style: Literal["tuple", "dict", "dataclass"] = "tuple",
        norm: bool = False,
        dropout: float = 0.0,
        hidden: int = 16,
        num_samples: int = 64,
        lr: float = 0.1,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, hidden),
            nn.BatchNorm1d(hidden) if norm else nn.Identity(),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 3),
        )
        self.style, self.num_samples, self.lr, self.shuffle = style, num_samples, lr, shuffle

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(inputs_of(batch)), labels_of(batch))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        collate = _collate_dataclass if self.style == "dataclass" else None
        return DataLoader(
            _Styled(self.style, self.num_samples), batch_size=16, shuffle=self.shuffle, collate_fn=collate
        )
