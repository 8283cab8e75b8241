"""The units of a channels-first activation whose last producing module put its units last (a LayerNorm applied
through a transpose, an nn.Linear on a squeeze-excitation branch): read from the dimension holding as many units as
that module makes. A copy of the network with its channels permuted is the same function and the same
representation up to every group, so every measure is 1 (the producer's dimension alone gave CKA 0.06 and 0.01)."""

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_nt.similarity import RepresentationSimilarity
from lightning_nt.similarity.callback import _unit_dim_of, _units_of


class Base(pl.LightningModule):
    def __init__(self, shape):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(64, *shape, generator=g), torch.randn(64, generator=g)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return (self(x) - y).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: the network stays the reference's

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16)


class Wav2Vec2Like(Base):
    """HF Wav2Vec2LayerNormConvLayer: conv, transpose, layer_norm, transpose back, activation ([B, C, T])."""

    def __init__(self):
        super().__init__((4, 40))
        self.conv = nn.Conv1d(4, 12, 3)
        self.layer_norm = nn.LayerNorm(12)
        self.activation = nn.GELU()
        self.out = nn.Conv1d(12, 1, 1)

    def forward(self, x):
        h = self.conv(x).transpose(-2, -1)
        h = self.layer_norm(h).transpose(-2, -1)
        h = self.activation(h)
        return self.out(h).mean(dim=(1, 2))

    def permuted(self, p):
        m = copy.deepcopy(self)
        with torch.no_grad():
            m.conv.weight.copy_(self.conv.weight[p])
            m.conv.bias.copy_(self.conv.bias[p])
            m.layer_norm.weight.copy_(self.layer_norm.weight[p])
            m.layer_norm.bias.copy_(self.layer_norm.bias[p])
            m.out.weight.copy_(self.out.weight[:, p])
        return m


class SEBlock(Base):
    """senet.pytorch's SEBasicBlock: conv, bn, SE with nn.Linear, scale, relu ([B, C, H, W])."""

    def __init__(self):
        super().__init__((3, 10, 10))
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16, momentum=0.0)  # stats fixed
        self.fc = nn.Sequential(nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid())
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        h = self.bn(self.conv(x))
        s = self.fc(h.mean(dim=(2, 3)))[:, :, None, None]
        h = self.relu(h * s)
        return self.head(h.mean(dim=(2, 3))).squeeze(-1)

    def permuted(self, p):
        m = copy.deepcopy(self)
        with torch.no_grad():
            m.conv.weight.copy_(self.conv.weight[p])
            m.conv.bias.copy_(self.conv.bias[p])
            for n in ("weight", "bias", "running_mean", "running_var"):
                getattr(m.bn, n).copy_(getattr(self.bn, n)[p])
            m.fc[0].weight.copy_(self.fc[0].weight[:, p])
            m.fc[2].weight.copy_(self.fc[2].weight[p])
            m.fc[2].bias.copy_(self.fc[2].bias[p])
            m.head.weight.copy_(self.head.weight[:, p])
        return m


@pytest.mark.parametrize(("cls", "layer", "channels"), [(Wav2Vec2Like, "activation", 12), (SEBlock, "relu", 16)])
def test_channels_first_units_after_a_producer_of_last_dimension_units(cls, layer, channels):
    torch.manual_seed(0)
    model = cls()
    reference = model.permuted(torch.randperm(channels))
    monitor = RepresentationSimilarity(layers=[layer], reference=reference, num_examples=64)
    pl.Trainer(
        max_epochs=1,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model)
    assert monitor._unit_dims[layer] == 1
    measured = {tag: value for tag, value in monitor.history[-1].items() if tag.startswith("similarity/")}
    assert measured and all(value == pytest.approx(1.0, abs=1e-5) for value in measured.values())


def test_the_unit_dimension_is_the_one_holding_the_producers_unit_count():
    images, tokens = torch.zeros(2, 16, 10, 10), torch.zeros(2, 7, 12)
    assert _units_of(nn.LayerNorm([16, 10, 10])) == (1, 16)  # a WGAN-GP critic's norm over [C, H, W]
    assert _unit_dim_of(images, _units_of(nn.LayerNorm(16))) == 1  # timm's LayerNorm2d: channels are dimension 1
    assert _unit_dim_of(images.permute(0, 2, 3, 1), _units_of(nn.Linear(4, 16))) == -1  # ConvNeXt, channels last
    assert _unit_dim_of(tokens, _units_of(nn.Linear(4, 12))) == -1
    assert _unit_dim_of(tokens, _units_of(nn.Linear(4, 5))) == -1  # neither (a Conv1D came between): its place
    assert _unit_dim_of(images, _units_of(nn.Linear(4, 5))) == 1  # images fall back to channels first
    assert _unit_dim_of(tokens, None) is None and _unit_dim_of(images, None) == 1
    assert _unit_dim_of(torch.zeros(2, 12, 12), _units_of(nn.Linear(4, 12))) == -1  # both: the producer's choice
    assert _unit_dim_of(torch.zeros(2, 10, 10, 10), _units_of(nn.Linear(4, 10))) == 1  # both, images: channels first
