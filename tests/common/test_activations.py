"""``common.activations``: the recognition of an activation by what it computes, shared by two capabilities."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_nt.common.activations import computed_function
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
        (nn.ReLU6(), None, None),
        (nn.LeakyReLU(), None, None),
        (nn.Hardtanh(), None, None),
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
