"""The base class of lightning_nt's callbacks: what every capability owes a Trainer before it touches the module.

It derives from the ``Callback`` of every installed Lightning package (``pytorch_lightning``, and
``lightning.pytorch`` where ``lightning`` is installed: the two hold the same hooks, so the first one's methods serve
both), so that either package's Trainer and ``LightningCLI`` take our callbacks. Its ``setup`` refuses what no
capability supports; a capability that overrides ``setup`` calls it first.

Lightning names every hook call after the callback's ``state_key`` (for its profiler): about ten times a training
batch. A capability's key is built from its arguments, so it is computed once when the run is set up and kept until
teardown (the key a checkpoint stores must not change during a run anyway).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from lightning_nt.common.distributed import check_unsharded
from lightning_nt.common.flavours import lightning_classes

__all__ = ["Callback"]


class Callback(*lightning_classes("Callback")):  # type: ignore[misc]
    """The base of lightning_nt's callbacks (see the module's docstring).

    Example::

        class MyMonitor(Callback):
            @override
            def setup(self, trainer, pl_module, stage):
                super().setup(trainer, pl_module, stage)  # the shared checks first
                ...
    """

    _run_state_key: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        key = cls.__dict__.get("state_key")
        if isinstance(key, property) and key.fget is not None:
            cls.state_key = property(_kept_during_a_run(key.fget))  # type: ignore[assignment,method-assign]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_unsharded(trainer, type(self).__name__)
        self._run_state_key = None
        self._run_state_key = self.state_key

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run_state_key = None


def _kept_during_a_run(build: Callable[[Any], str]) -> Callable[[Any], str]:
    def state_key(self: Any) -> str:
        return self._run_state_key or build(self)

    state_key.__doc__ = build.__doc__
    return state_key
