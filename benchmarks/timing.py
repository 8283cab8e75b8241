"""Step timing shared by the benchmarks."""

from __future__ import annotations

import statistics
import time

import pytorch_lightning as pl
import torch


class StepTimer(pl.Callback):
    """Wall time at every training batch start (the device synchronised first), for per-step medians."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def median_step(self, warmup: int) -> float:
        """Median seconds between consecutive steps, after ``warmup`` steps."""
        return median_step(self.times, warmup)


def median_step(times: list[float], warmup: int) -> float:
    return statistics.median(b - a for a, b in zip(times[warmup:], times[warmup + 1 :]))
