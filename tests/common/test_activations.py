"""``common.activations``: the recognition of an activation by what it computes, shared by two capabilities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_nt.common.activations import clamp_bounds, computed_function
from lightning_nt.similarity.activations import recognised_activation


class Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class MyReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=0)


@pytest.mark.parametrize(
    ("module", "function", "group"),
    [
        (MyReLU(), "relu", "relu"),
        (nn.Hardtanh(0.0, math.inf), "relu", "relu"),
        (nn.Threshold(0.0, 0.0), "relu", "relu"),
        (Swish(), "silu", "gelu"),
        (nn.GELU(approximate="tanh"), "gelu", "gelu"),
        (nn.Tanh(), "tanh", "tanh"),
        (nn.Sigmoid(), "sigmoid", "sigmoid"),
        (nn.ReLU6(), "hardtanh", "gelu"),  # saturates at 6: positive scalings are not its symmetries
        (nn.LeakyReLU(), "leaky_relu", "relu"),
        (nn.Hardtanh(), "hardtanh", "tanh"),  # odd: sign flips are its symmetries
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else str(value),
)
def test_the_function_is_named_and_the_old_import_path_maps_it_to_its_group(module, function, group) -> None:
    assert computed_function(module) == function
    assert recognised_activation(module) == group


def test_a_module_is_run_once_however_often_it_is_asked_about():
    """LazinessMonitor looks for activations at every measurement: a parameter-free module with a side effect (a
    call counter) is run on the grid once, not once per question."""

    class CountingReLU(nn.Module):
        calls = 0

        def forward(self, x):
            CountingReLU.calls += 1
            return x.clamp(min=0)

    module = CountingReLU()
    assert [computed_function(module) for _ in range(3)] == ["relu"] * 3
    assert CountingReLU.calls == 1


def test_the_modules_own_hooks_do_not_see_the_recognition_grid():
    """A user's forward hook on an activation (recording features) must not receive the grid the module is run on."""
    seen = []
    module = MyReLU()
    module.register_forward_hook(lambda _, inputs, output: seen.append(output))
    assert computed_function(module) == "relu"
    assert seen == []


class Clamp(nn.Module):  # a model's own ReLU6 / Hardtanh
    def __init__(self, low: float | None, high: float | None) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(self.low, self.high)

    def extra_repr(self) -> str:
        return f"{self.low}, {self.high}"


class Leaky(nn.Module):  # a model's own LeakyReLU
    def __init__(self, slope: float, positive_slope: float = 1.0) -> None:
        super().__init__()
        self.slope, self.positive_slope = slope, positive_slope

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, self.positive_slope * x, self.slope * x)

    def extra_repr(self) -> str:
        return f"{self.slope}, {self.positive_slope}"


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


@pytest.mark.parametrize(
    ("module", "function", "bounds"),
    [
        (Clamp(0.0, 6.0), "hardtanh", (0.0, 6.0)),
        (Clamp(-0.37, 2.1), "hardtanh", (_float32(-0.37), _float32(2.1))),  # bounds between grid points
        (Clamp(None, 1.5), "hardtanh", (-math.inf, 1.5)),
        (Clamp(-1.0, None), "hardtanh", (-1.0, math.inf)),
        (Clamp(None, 0.0), "hardtanh", (-math.inf, 0.0)),
        (Clamp(0.0, None), "relu", None),  # the clamp to [0, inf] is ReLU
        (Clamp(-1e9, 1e9), None, None),  # the identity on the grid
        (Clamp(0.0, 0.0), None, None),  # a constant
        (Leaky(0.01), "leaky_relu", None),
        (Leaky(-0.5), "leaky_relu", None),
        (Leaky(0.0), "relu", None),
        (Leaky(1.0), None, None),  # the identity
        (Leaky(0.1, positive_slope=2.0), None, None),  # not max(x, slope x)
    ],
    ids=str,
)
def test_a_leaky_relu_or_a_clamp_of_another_class_is_recognised_with_its_bounds(module, function, bounds) -> None:
    """LeakyReLU of any slope and a clamp to any interval (ReLU6, Hardtanh) written by hand; the clamp's bounds are
    read off its output (found: only ReLU, GELU, SiLU, tanh and sigmoid were recognised)."""
    assert computed_function(module) == function
    assert clamp_bounds(module) == bounds


@pytest.mark.parametrize(
    ("module", "bounds"),
    [
        (nn.ReLU6(), (0.0, 6.0)),
        (nn.Hardtanh(), (-1.0, 1.0)),
        (nn.Hardtanh(-0.1, 0.3), (-0.1, 0.3)),  # exactly its own bounds, not their float32 roundings
        (nn.Hardtanh(-1e9, 1e9), (-1e9, 1e9)),  # beyond the grid
        (nn.Hardtanh(0.0, math.inf), (0.0, math.inf)),
        (nn.ReLU(), None),
        (nn.LeakyReLU(), None),
    ],
    ids=str,
)
def test_a_hardtanh_module_has_its_own_bounds(module, bounds) -> None:
    assert clamp_bounds(module) == bounds
