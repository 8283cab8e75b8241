"""Tiny models and data for the tests."""

from lightning_nt.demos import DigitsCNN, DigitsDataModule
from tests.helpers.models import (
    BoringModel,
    DictLossClassifier,
    ManualOptimizationModule,
    TinyClassifier,
    TinyTransformer,
    classification_data,
)
from tests.helpers.trainer import read_tensorboard_scalars, read_tensorboard_tags, tiny_trainer

__all__ = [
    "BoringModel",
    "DictLossClassifier",
    "DigitsCNN",
    "DigitsDataModule",
    "ManualOptimizationModule",
    "TinyClassifier",
    "TinyTransformer",
    "classification_data",
    "read_tensorboard_scalars",
    "read_tensorboard_tags",
    "tiny_trainer",
]
