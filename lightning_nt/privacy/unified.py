"""DP-SGD for the unified ``lightning`` package (``import lightning as L``): :class:`DPStrategy` and
:class:`DPDDPStrategy` built on ``lightning.pytorch``'s strategies, which its Trainer requires.

``pytorch_lightning`` and ``lightning.pytorch`` are the same code under two names, and a Trainer accepts only its own
package's strategies. Everything else is shared: the strategy names (``strategy="dp_sgd"``, ``"dp_sgd_ddp"``) are
registered with both packages' Trainers when ``lightning`` is installed, and lightning_nt's callbacks work in either.

Example::

    import lightning as L
    from lightning_nt.privacy.unified import DPStrategy

    trainer = L.Trainer(max_epochs=10, strategy=DPStrategy(target_epsilon=8.0))  # or strategy="dp_sgd"
"""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_nt.privacy.strategy import _PrivateOnManyDevices, _PrivateOnOneDevice

__all__ = ["DPDDPStrategy", "DPStrategy"]


class DPStrategy(_PrivateOnOneDevice, SingleDeviceStrategy):
    """:class:`lightning_nt.DPStrategy` (same arguments, same behaviour) for ``lightning.pytorch``'s Trainer."""

    strategy_name = "dp_sgd"


class DPDDPStrategy(_PrivateOnManyDevices, DDPStrategy):
    """:class:`lightning_nt.DPDDPStrategy` (same arguments, same behaviour) for ``lightning.pytorch``'s Trainer."""

    strategy_name = "dp_sgd_ddp"
