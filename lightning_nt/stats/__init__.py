"""Dimension-agnostic tests from cross U-statistics (Kim & Ramdas 2024; Shekhar, Kim & Ramdas 2022).

``cross_mean_test`` (is the mean of high-dimensional vectors zero?), ``cross_mmd_test`` (do two samples come
from the same distribution?), ``compare_models`` (do two models' outputs differ?) and the
``GradientSignalTest`` callback (does the population gradient still carry detectable signal?).
"""

from lightning_nt.stats.callback import GradientSignalTest
from lightning_nt.stats.compare import compare_models
from lightning_nt.stats.cross import (
    Alternative,
    TestResult,
    cross_mean_statistics,
    cross_mean_test,
    cross_mmd_statistics,
    cross_mmd_test,
    normal_p_value,
    split_indices,
    studentized_mean,
)
from lightning_nt.stats.gradient import PerExampleLoss, directional_derivatives, per_example_losses

__all__ = [
    "Alternative",
    "GradientSignalTest",
    "PerExampleLoss",
    "TestResult",
    "compare_models",
    "cross_mean_statistics",
    "cross_mean_test",
    "cross_mmd_statistics",
    "cross_mmd_test",
    "directional_derivatives",
    "normal_p_value",
    "per_example_losses",
    "split_indices",
    "studentized_mean",
]
