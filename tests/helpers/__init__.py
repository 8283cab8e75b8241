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
from tests.helpers.ranks import assert_ranks_agree, rank_states, save_rank_state
from tests.helpers.trainer import (
    SaveHistory,
    assert_same_training,
    read_tensorboard_scalars,
    read_tensorboard_tags,
    seeded_fit,
    tiny_trainer,
)
from tests.helpers.zoo import ZOO, ZooEntry, ZooModule

__all__ = [
    "ZOO",
    "BoringModel",
    "DictLossClassifier",
    "DigitsCNN",
    "DigitsDataModule",
    "ManualOptimizationModule",
    "SaveHistory",
    "TinyClassifier",
    "TinyTransformer",
    "ZooEntry",
    "ZooModule",
    "assert_ranks_agree",
    "assert_same_training",
    "classification_data",
    "rank_states",
    "read_tensorboard_scalars",
    "read_tensorboard_tags",
    "save_rank_state",
    "seeded_fit",
    "tiny_trainer",
]
