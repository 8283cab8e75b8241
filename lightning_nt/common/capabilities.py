"""What a capability declares about itself, so that other capabilities can read it without importing it.

Dependencies point down: a strategy that must know which callbacks read the training data outside the
training step (DP-SGD, whose guarantee covers only what goes through its noisy update) reads this
declaration instead of importing every capability that has it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["ReadsTrainingData", "reads_training_data_outside_step"]


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
