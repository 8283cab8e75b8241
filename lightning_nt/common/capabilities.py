"""What a capability declares about itself, so that other capabilities can read it without importing it.

Dependencies point down: a strategy that must know which callbacks read the training data outside the
training step (DP-SGD, whose guarantee covers only what goes through its noisy update) reads this
declaration instead of importing every capability that has it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import pytorch_lightning as pl

__all__ = ["ReadsTrainingData", "reads_training_data_outside_step", "run_before_other_callbacks"]


@runtime_checkable
class ReadsTrainingData(Protocol):
    """A callback that computes on training batches outside ``training_step`` (probes, searches, reports).

    Declare it with one class attribute::

        class SharpnessMonitor(pl.Callback):
            reads_training_data_outside_step: ClassVar[bool] = True
    """

    reads_training_data_outside_step: ClassVar[bool]


def reads_training_data_outside_step(callback: Any) -> bool:
    """``True`` if ``callback`` declares that it reads training data outside the training step: a class attribute,
    or a property where it depends on the configuration (``GradientSignalTest(data="train")``).

    Examples:
        >>> class Probe:
        ...     reads_training_data_outside_step = True
        >>> reads_training_data_outside_step(Probe()), reads_training_data_outside_step(object())
        (True, False)
    """
    return getattr(callback, "reads_training_data_outside_step", False) is True


def run_before_other_callbacks(trainer: pl.Trainer, callback: pl.Callback) -> None:
    """Move ``callback`` in front of the Trainer's other lightning_nt callbacks, so that its hooks run before
    theirs whatever order the user listed them in (the user's own callbacks keep their places).

    For a capability that changes the weights the others measure: GradInit rescales the initialisation in
    ``on_train_start``, where monitors take their step-0 reference; IterateAveraging puts its average into the
    module in ``on_train_end``, where reporters describe the final model. Call it from ``setup``: Lightning calls
    ``setup`` while it walks the list, and moving the callback being visited forward leaves the ones it has not
    visited yet where they are.
    """
    callbacks = trainer.callbacks
    ours = [c for c in callbacks if c is not callback and _is_ours(c)]
    if not ours or callbacks.index(callback) < callbacks.index(ours[0]):
        return
    callbacks.remove(callback)
    callbacks.insert(callbacks.index(ours[0]), callback)


def _is_ours(callback: pl.Callback) -> bool:
    """A lightning_nt callback, or a user's subclass of one (whose class lives in the user's module)."""
    return any(cls.__module__.startswith("lightning_nt.") for cls in type(callback).__mro__)
