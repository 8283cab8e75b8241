"""Activation modules written elsewhere are recognised by what they compute (``similarity.activations``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_nt.similarity import RepresentationSimilarity
from lightning_nt.similarity.activations import recognised_activation
from tests.helpers import TinyClassifier, seeded_fit


class GELUActivation(nn.Module):  # HuggingFace BERT's, through the functional GELU
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x)


class NewGELUActivation(nn.Module):  # HuggingFace GPT-2's, the tanh approximation written out
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class FastGELUActivation(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


class Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class FunctionalReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, min=0)


class CappedReLU(nn.Module):  # ReLU capped far out
    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(0, 60)


class QuickGELU(nn.Module):  # x sigmoid(1.702 x): close to GELU, not GELU
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ReversedReLU(nn.Module):  # mixes positions
    def forward(self, x: Tensor) -> Tensor:
        return x.flip(-1).relu()


class Scaled(nn.Module):  # holds a buffer: never run
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.relu(x) * self.scale


@pytest.mark.parametrize(
    ("module", "group"),
    [
        (GELUActivation(), "gelu"),
        (NewGELUActivation(), "gelu"),
        (FastGELUActivation(), "gelu"),
        (Swish(), "gelu"),
        (FunctionalReLU(), "relu"),
        (nn.Tanh(), "tanh"),
        (nn.Hardtanh(-1e9, 1e9), None),  # the identity on the grid: not an activation with a known group
        (nn.Sigmoid(), "sigmoid"),
        (QuickGELU(), None),
        (nn.ReLU6(), None),  # equal to ReLU on [-6, 6] only; positive scalings are not its symmetries
        (CappedReLU(), None),
        (ReversedReLU(), None),
        (nn.Softmax(dim=-1), None),
        (nn.Identity(), None),
        (nn.Flatten(0), None),
        (nn.Sequential(nn.ReLU()), None),  # containers are not activations
        (nn.Linear(241, 241), None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else str(value),
)
def test_a_module_is_recognised_by_the_function_it_computes(module: nn.Module, group: str | None) -> None:
    assert recognised_activation(module) == group


def test_a_module_with_state_is_not_run() -> None:
    module = Scaled()
    assert recognised_activation(module) is None and module.calls == 0


def test_dropout_runs_in_eval_mode_and_leaves_the_random_state_and_the_mode_as_they_were() -> None:
    dropout = nn.Dropout(0.5).train()
    state = torch.get_rng_state()
    assert recognised_activation(dropout) is None
    assert torch.equal(torch.get_rng_state(), state) and dropout.training


def test_the_callback_compares_the_outputs_of_an_activation_class_written_elsewhere() -> None:
    """BERT's GELU as HuggingFace writes it: found by ``layers=None``, with the GELU group."""
    module = TinyClassifier(num_samples=64, shuffle=False)
    module.net[1] = GELUActivation()
    monitor = RepresentationSimilarity(num_examples=32)
    seeded_fit([monitor], lambda: module, max_epochs=1)
    assert "similarity/intertwiner/net.1" in monitor.history[-1]
    assert "| net.1 | gelu |" in monitor.table()
