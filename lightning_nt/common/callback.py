"""The base class of lightning_nt's callbacks: what every capability owes a Trainer before it touches the module.

It derives from the ``Callback`` of every installed Lightning package (``pytorch_lightning``, and
``lightning.pytorch`` where ``lightning`` is installed: the two hold the same hooks, so the first one's methods serve
both), so that either package's Trainer and ``LightningCLI`` take our callbacks. Its ``setup`` refuses what no
capability supports; a capability that overrides ``setup`` calls it first.
"""

from __future__ import annotations

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

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_unsharded(trainer, type(self).__name__)
