"""Module shapes the compression tests need beyond tests/helpers: tied weights, a frozen layer, attention, an LSTM,
a one-logit classifier and a regressor. Each is TinyClassifier's data and loop with another network."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import TinyClassifier, classification_data


class TiedClassifier(TinyClassifier):
    """Class embeddings shared with the output layer (as a language model ties its embedding and its head)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.encoder = nn.Linear(self.dim, 16)
        self.embedding = nn.Embedding(self.classes, 16)
        self.head = nn.Linear(16, self.classes)
        self.head.weight = self.embedding.weight
        del self.net

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(torch.tanh(self.encoder(inputs)))


class FrozenFirstLayer(TinyClassifier):
    """A "pretrained" first layer the user froze: its values are not what any seed draws."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        with torch.no_grad():
            self.net[0].weight.copy_(torch.linspace(-1, 1, self.net[0].weight.numel()).view_as(self.net[0].weight))
        self.net[0].requires_grad_(False)


class _Sequence(TinyClassifier):
    """Reads the 8 inputs as a sequence of 4 steps of 2 features."""

    def steps(self, inputs: Tensor) -> Tensor:
        return inputs.view(len(inputs), 4, self.dim // 4)


class AttentionClassifier(_Sequence):
    """``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside) over the 4 steps."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.embed = nn.Linear(self.dim // 4, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(16, self.classes)
        del self.net

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(self.steps(inputs))).mean(dim=1))


class LSTMClassifier(_Sequence):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lstm = nn.LSTM(self.dim // 4, 16, batch_first=True)
        self.head = nn.Linear(16, self.classes)
        del self.net

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.lstm(self.steps(inputs))[0][:, -1])


def separable_data(num_samples: int, seed: int) -> TensorDataset:
    """Labels 0/1 (as floats, for ``BCEWithLogitsLoss``) given by the sign of the first input."""
    inputs = torch.randn(num_samples, 8, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(inputs, (inputs[:, 0] > 0).float())


class OneLogitClassifier(TinyClassifier):
    """A binary classifier with one output column, trained with ``BCEWithLogitsLoss``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(classes=2, **kwargs)
        self.net[-1] = nn.Linear(self.net[-1].in_features, 1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        return F.binary_cross_entropy_with_logits(self(inputs).squeeze(1), labels)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        pass

    def train_dataloader(self) -> DataLoader:
        return DataLoader(separable_data(self.num_samples, seed=0), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(separable_data(64, seed=1), batch_size=64)


class Regressor(OneLogitClassifier):
    """An MSE regressor: its targets are real numbers, which no 0-1 error describes."""

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        inputs, targets = batch
        return F.mse_loss(self(inputs).squeeze(1), targets)

    def train_dataloader(self) -> DataLoader:
        inputs = torch.randn(self.num_samples, 8, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(inputs, inputs.sum(dim=1)), batch_size=self.batch_size)


class SoftLabelClassifier(TinyClassifier):
    """Trained on float ``(n, classes)`` targets: one-hot rows, or rows smoothed by ``smoothing`` (label smoothing)."""

    def __init__(self, smoothing: float = 0.0, label_classes: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.smoothing, self.label_classes = smoothing, label_classes or self.classes

    def soft_data(self) -> TensorDataset:
        inputs, labels = classification_data(self.num_samples, self.dim, self.classes).tensors
        one_hot = F.one_hot(labels, self.label_classes).float()
        return TensorDataset(inputs, one_hot * (1 - self.smoothing) + self.smoothing / self.label_classes)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        inputs, targets = batch
        return F.cross_entropy(self(inputs), targets)  # probabilities as targets

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.soft_data(), batch_size=self.batch_size, shuffle=True)
