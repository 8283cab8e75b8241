"""Small, download-free tasks for examples, tests and benchmarks."""

from lightning_nt.demos.deep_net import DeepDigitsMLP
from lightning_nt.demos.digits import DigitsClassifier, DigitsCNN, DigitsDataModule, DigitsMLP, load_digits_tensors
from lightning_nt.demos.edge_of_stability import FullBatch, FullBatchMLP, half_mean_squared_error
from lightning_nt.demos.wide_resnet import StandardizedConv2d, wide_resnet

__all__ = [
    "DeepDigitsMLP",
    "DigitsCNN",
    "DigitsClassifier",
    "DigitsDataModule",
    "DigitsMLP",
    "FullBatch",
    "FullBatchMLP",
    "StandardizedConv2d",
    "half_mean_squared_error",
    "load_digits_tensors",
    "wide_resnet",
]
