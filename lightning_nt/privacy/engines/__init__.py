"""Per-example clipping (a DP-SGD stage): one interface, one engine per ``grad_sample_mode``, chosen here.

- ``"hooks"`` (and ``"functorch"``): :class:`~.hooks.OpacusHooksEngine`, Opacus's hooks form every
  example's gradient, the optimizer clips and sums them;
- ``"ghost"``: :class:`~.ghost.GhostClippingEngine`, norms from a first backward pass, the clipped sum from a second;
- ``"bk"``: :class:`~.bk.BookKeepingEngine`, one backward pass, per-layer ghost or instantiated norms.

The strategy builds its engine with :func:`clipping_engine` and then only calls :class:`ClippingEngine`'s methods.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_nt.privacy.engines.base import ClippingEngine
from lightning_nt.privacy.engines.bk import BookKeepingEngine
from lightning_nt.privacy.engines.ghost import GhostClippingEngine
from lightning_nt.privacy.engines.hooks import OpacusHooksEngine

__all__ = ["ClippingEngine", "GradSampleMode", "clipping_engine", "engine_class"]

GradSampleMode = Literal["hooks", "functorch", "ghost", "bk"]
_ENGINES: dict[str, type[ClippingEngine]] = {
    "hooks": OpacusHooksEngine,
    "functorch": OpacusHooksEngine,
    "ghost": GhostClippingEngine,
    "bk": BookKeepingEngine,
}


def engine_class(mode: GradSampleMode) -> type[ClippingEngine]:
    """The engine of ``grad_sample_mode=mode`` (its class: options and precision are checked before it is built)."""
    return _ENGINES[mode]


def clipping_engine(
    mode: GradSampleMode,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    secure_mode: bool,
    views: int,
    distributed: bool,
) -> ClippingEngine:
    """Attach the engine of ``mode`` to ``module`` and wrap ``optimizer`` in its ``DPOptimizer`` (``.optimizer``).

    Example::

        engine = clipping_engine("bk", module, optimizer, max_grad_norm=1.0, noise_multiplier=1.0,
                                 secure_mode=False, views=1, distributed=False)
    """
    return engine_class(mode)(
        mode,
        module,
        optimizer,
        max_grad_norm=max_grad_norm,
        noise_multiplier=noise_multiplier,
        secure_mode=secure_mode,
        views=views,
        distributed=distributed,
    )
