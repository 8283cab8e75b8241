"""The lazy (kernel) regime: weight distance from init, activation-pattern flips, the empirical NTK, and a monitor."""

from lightning_nt.laziness.callback import LazinessMonitor, TargetFn
from lightning_nt.laziness.distance import RelativeDistance, relative_distance
from lightning_nt.laziness.ntk import (
    ForwardFn,
    TwoLayerReLU,
    empirical_ntk,
    jacobian_bytes,
    kernel_alignment,
    two_layer_relu_ntk,
    zero_centred_kernels,
)
from lightning_nt.laziness.patterns import (
    ACTIVATIONS,
    activation_layers,
    activation_patterns,
    is_activation,
    pattern_flips,
)

__all__ = [
    "ACTIVATIONS",
    "ForwardFn",
    "LazinessMonitor",
    "RelativeDistance",
    "TargetFn",
    "TwoLayerReLU",
    "activation_layers",
    "activation_patterns",
    "empirical_ntk",
    "is_activation",
    "jacobian_bytes",
    "kernel_alignment",
    "pattern_flips",
    "relative_distance",
    "two_layer_relu_ntk",
    "zero_centred_kernels",
]
