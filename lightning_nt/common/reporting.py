"""Logging scalars, text and pictures to every logger a Trainer has, from any hook.

``LightningModule.log`` is forbidden in ``on_fit_start``, ``on_train_end`` and ``on_fit_end`` and
logs through the module, so callbacks here write the way Lightning's own monitors do: straight to
each logger (loggers are rank-zero-only themselves), and into ``trainer.callback_metrics`` so that
``ModelCheckpoint``/``EarlyStopping`` and user code can read the values on every rank.

Text and pictures go to loggers that can show them: TensorBoard (``add_text``/``add_figure``) and
any logger with ``log_text``/``log_image`` (e.g. Weights & Biases). Others (CSV) skip them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["log_figure", "log_scalars", "log_text"]


def log_scalars(
    trainer: pl.Trainer, metrics: Mapping[str, float | Tensor], step: int | None = None, *, to_loggers: bool = True
) -> None:
    """Write ``metrics`` to every logger at ``step`` (default: ``trainer.global_step``) and to ``callback_metrics``.

    Lightning clears ``callback_metrics`` after the sanity check, so values logged in ``on_fit_start`` reach
    the loggers but not the ``callback_metrics`` seen after it. ``to_loggers=False`` writes ``callback_metrics``
    only (as ``self.log(..., logger=False)`` does).

    Examples:
        >>> trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> log_scalars(trainer, {"sharpness/lambda_max": 12.5})
        >>> trainer.callback_metrics["sharpness/lambda_max"]
        tensor(12.5000)
    """
    if not metrics:
        return
    step = trainer.global_step if step is None else step
    values = {tag: float(value) for tag, value in metrics.items()}
    for tag, value in values.items():
        trainer.callback_metrics[tag] = torch.tensor(value)
    if not to_loggers:
        return
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def log_text(trainer: pl.Trainer, tag: str, text: str, step: int | None = None) -> None:
    """Write a text (Markdown for TensorBoard) to every logger that shows text."""
    step = trainer.global_step if step is None else step
    for experiment, logger in _experiments(trainer):
        if hasattr(experiment, "add_text"):
            experiment.add_text(tag, text, global_step=step)
        elif hasattr(logger, "log_text"):
            logger.log_text(key=tag, columns=["text"], data=[[text]], step=step)


def log_figure(trainer: pl.Trainer, tag: str, figure: Figure, step: int | None = None) -> None:
    """Write a matplotlib figure to every logger that shows pictures, then close it."""
    import matplotlib.pyplot as plt

    step = trainer.global_step if step is None else step
    for experiment, logger in _experiments(trainer):
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(tag, figure, global_step=step, close=False)
        elif hasattr(logger, "log_image"):
            logger.log_image(key=tag, images=[figure], step=step)
    plt.close(figure)


def _experiments(trainer: pl.Trainer) -> list[tuple[Any, pl.loggers.Logger]]:
    if not trainer.is_global_zero:
        return []
    return [(logger.experiment, logger) for logger in trainer.loggers]
