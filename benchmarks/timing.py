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


def lightning_step_time(
    module: pl.LightningModule, loader: torch.utils.data.DataLoader, steps: int, warmup: int, **trainer_kwargs: object
) -> float:
    """Median seconds per Lightning training step of ``module`` on ``loader`` (one device, nothing else on)."""
    torch.manual_seed(0)
    timer = StepTimer()
    callbacks = [timer, *trainer_kwargs.pop("callbacks", [])]  # type: ignore[misc]
    trainer = pl.Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu",
        devices=1,
        max_steps=steps + warmup + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,  # type: ignore[arg-type]
    )
    trainer.fit(module, loader)
    return timer.median_step(warmup)
