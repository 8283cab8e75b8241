"""Sharpness and the edge of stability: HVPs, Lanczos, thresholds, landscape metrics, and a Lightning monitor."""

from lightning_nt.sharpness.callback import SharpnessMonitor
from lightning_nt.sharpness.hvp import HessianOperator
from lightning_nt.sharpness.lanczos import LanczosResult, lanczos, warm_start
from lightning_nt.sharpness.measure import (
    Smoothness,
    TraceEstimate,
    batch_sharpness,
    hutchinson_trace,
    preconditioned,
    smoothness_along_gradient,
)
from lightning_nt.sharpness.thresholds import StabilityThreshold, adam_preconditioner, stability_threshold

__all__ = [
    "HessianOperator",
    "LanczosResult",
    "SharpnessMonitor",
    "Smoothness",
    "StabilityThreshold",
    "TraceEstimate",
    "adam_preconditioner",
    "batch_sharpness",
    "hutchinson_trace",
    "lanczos",
    "preconditioned",
    "smoothness_along_gradient",
    "stability_threshold",
    "warm_start",
]
