"""A quiet, deterministic CPU Trainer and a reader for the TensorBoard event files it writes."""

from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers.models import TinyClassifier
from tests.helpers.ranks import save_rank_state


def tiny_trainer(root: Path | str | None = None, **overrides: Any) -> pl.Trainer:
    """A CPU Trainer without progress bar, summary or checkpoints; logs to TensorBoard under ``root`` when given."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "deterministic": True,
        "logger": pl.loggers.TensorBoardLogger(str(root), name="", version="") if root is not None else False,
        "default_root_dir": str(root) if root is not None else None,
        "log_every_n_steps": 1,
    }
    settings.update(overrides)
    if settings["devices"] != 1:
        settings["callbacks"] = [*settings.get("callbacks", []), OrderlyProcessGroupExit()]
    return pl.Trainer(**settings)


class OrderlyProcessGroupExit(pl.Callback):
    """Tears the gloo process group down on every rank together before a spawned worker exits.

    Lightning destroys only NCCL groups at exit; a gloo group left to interpreter shutdown can abort a worker
    ("terminate called without an active exception") while its peer is still connected, failing a test whose
    training had already finished.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # registered only once training ended normally: a rank that failed mid-training must not wait at a barrier
        atexit.register(_destroy_process_group)


class SaveHistory(pl.Callback):
    """ddp_spawn sends no callback state back to the parent: each rank saves ``monitor.history`` to a file."""

    def __init__(self, monitor: Any, directory: Path | str) -> None:
        self.monitor, self.directory = monitor, str(directory)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_rank_state(trainer, self.directory, self.monitor.history)


def seeded_fit(
    callbacks: list[pl.Callback],
    module: Callable[[], pl.LightningModule] | pl.LightningModule | None = None,
    root: Path | str | None = None,
    seed: int = 0,
    **trainer_kwargs: Any,
) -> tuple[pl.LightningModule, pl.Trainer]:
    """Seed, build the module from its factory after seeding (default: ``TinyClassifier`` on 96 examples), fit."""
    pl.seed_everything(seed)
    if module is None:
        module = TinyClassifier(num_samples=96)
    elif not isinstance(module, pl.LightningModule):
        module = module()
    trainer = tiny_trainer(root, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module)
    return module, trainer


def assert_same_training(
    module: pl.LightningModule, trainer: pl.Trainer, expected_module: pl.LightningModule, expected_trainer: pl.Trainer
) -> None:
    """The weights and the optimizer state of a fit are bit for bit those of ``expected``'s (the run without)."""
    weights, expected_weights = module.state_dict(), expected_module.state_dict()
    assert weights.keys() == expected_weights.keys()
    for name, value in weights.items():
        assert torch.equal(value, expected_weights[name]), name
    state = trainer.optimizers[0].state_dict()["state"]
    expected_state = expected_trainer.optimizers[0].state_dict()["state"]
    assert state.keys() == expected_state.keys()
    for key, fields in state.items():
        for field, value in fields.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(expected_state[key][field])), (key, field)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def read_tensorboard_scalars(log_dir: Path | str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files under ``log_dir``, as ``(step, value)`` pairs."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }


def read_tensorboard_tags(log_dir: Path | str) -> dict[str, list[str]]:
    """All tags by kind (``scalars``, ``images``, ``tensors`` for text, ...)."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    accumulator.Reload()
    return accumulator.Tags()
