"""ReLU-family activations of any class are found by what they compute, as RepresentationSimilarity finds them."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from lightning_nt.laziness import LazinessMonitor, activation_layers, activation_patterns, is_activation
from tests.helpers import seeded_fit
from tests.laziness.models import ReLUClassifier


class MyReLU(nn.Module):  # a model's own ReLU class
    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=0)


class GELUActivation(nn.Module):  # HuggingFace BERT's
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x)


class Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class MyTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.tanh()


class ScaledReLU(nn.Module):  # holds a parameter: not an activation of the ReLU family by what it computes
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) * self.scale


EQUAL_TO_RELU: dict[str, Callable[[], nn.Module]] = {
    "MyReLU": MyReLU,
    "Hardtanh(0, inf)": functools.partial(nn.Hardtanh, 0.0, math.inf),
    "Threshold(0, 0)": functools.partial(nn.Threshold, 0.0, 0.0),
}


@pytest.mark.parametrize(
    "module",
    [
        *(make() for make in EQUAL_TO_RELU.values()),
        GELUActivation(),
        Swish(),
        nn.LeakyReLU(0.1),
        nn.PReLU(),
        nn.ReLU6(),
        nn.ELU(),
    ],
    ids=lambda module: type(module).__name__,
)
def test_relu_family_modules_of_any_class_are_activations(module: nn.Module) -> None:
    """By type (``ACTIVATIONS``: LeakyReLU, PReLU, ReLU6 gate at 0) or by the function a parameter-free module
    computes (found: ``class MyReLU``, ``nn.Hardtanh(0, inf)`` and ``nn.Threshold(0, 0)`` were missed)."""
    assert is_activation(module)
    assert activation_layers(nn.Sequential(nn.Linear(3, 3), module)) == ["1"]


@pytest.mark.parametrize(
    "module",
    [nn.Tanh(), MyTanh(), nn.Sigmoid(), nn.Hardtanh(), nn.Softmax(dim=-1), nn.Identity(), nn.Dropout(), ScaledReLU()],
    ids=lambda module: type(module).__name__,
)
def test_a_module_outside_the_relu_family_is_not_taken_for_one(module: nn.Module) -> None:
    """Tanh and sigmoid have no gate at 0 (RepresentationSimilarity recognises them, with their own groups)."""
    assert not is_activation(module)
    assert activation_layers(nn.Sequential(nn.Linear(3, 3), module)) == []


def _with(activation: Callable[[], nn.Module] | None) -> ReLUClassifier:
    """``ReLUClassifier`` with its two ``nn.ReLU`` modules replaced by ``activation()`` (None: as it is)."""
    module = ReLUClassifier(shuffle=False)
    if activation is not None:
        module.net[2], module.net[5] = activation(), activation()
    return module


@pytest.mark.parametrize("activation", EQUAL_TO_RELU.values(), ids=list(EQUAL_TO_RELU))
def test_a_module_equal_to_relu_gives_the_patterns_of_nn_relu(activation: nn.Module) -> None:
    torch.manual_seed(0)
    reference, inputs = _with(None), torch.randn(12, 8)
    custom = _with(activation)
    custom.load_state_dict(reference.state_dict())
    expected = activation_patterns(reference, inputs)
    patterns = activation_patterns(custom, inputs)
    assert list(patterns) == list(expected) == ["net.2", "net.5"]
    for name, pattern in expected.items():
        assert torch.equal(patterns[name], pattern), name


@pytest.mark.parametrize("activation", EQUAL_TO_RELU.values(), ids=list(EQUAL_TO_RELU))
def test_a_module_equal_to_relu_is_measured_exactly_as_nn_relu(activation: nn.Module) -> None:
    """The same network with ``nn.ReLU`` or a module of another class equal to it: the same figures (found: no
    ``laziness/activation_flips`` and a warning that the model has no ReLU-family activation)."""
    histories = []
    for replacement in (None, activation):
        monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
        seeded_fit([monitor], functools.partial(_with, replacement), max_steps=4)
        histories.append(
            [{tag: v for tag, v in entry.items() if tag != "laziness/seconds"} for entry in monitor.history]
        )
    assert "laziness/activation_flips/net.5" in histories[0][-1]
    assert histories[1] == histories[0]
