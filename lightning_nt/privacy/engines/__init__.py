"""Per-example clipping (a DP-SGD stage): one interface, one engine per ``grad_sample_mode``, chosen here.

- ``"hooks"`` (and ``"functorch"``): :class:`~.hooks.OpacusHooksEngine`, Opacus's hooks form every
  example's gradient, the optimizer clips and sums them;
- ``"ghost"``: :class:`~.ghost.GhostClippingEngine`, norms from a first backward pass, the clipped sum from a second;
- ``"bk"``: :class:`~.bk.BookKeepingEngine`, one backward pass, per-layer ghost or instantiated norms;
- ``"auto"``: ``"bk"`` where it can clip every trainable layer of the module and honours the strategy's options,
  else ``"hooks"`` (:func:`resolved_mode`, once the module is known).

The strategy builds its engine with :func:`clipping_engine` and then only calls :class:`ClippingEngine`'s methods.
"""

from __future__ import annotations

from typing import Literal

import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch import nn

from lightning_nt.privacy.book_keeping.rules import layers_of
from lightning_nt.privacy.engines.base import ClippingEngine
from lightning_nt.privacy.engines.bk import BookKeepingEngine
from lightning_nt.privacy.engines.ghost import GhostClippingEngine
from lightning_nt.privacy.engines.hooks import OpacusHooksEngine

__all__ = ["ClippingEngine", "GradSampleMode", "clipping_engine", "engine_class", "resolved_mode"]

GradSampleMode = Literal["hooks", "functorch", "ghost", "bk", "auto"]
_ENGINES: dict[str, type[ClippingEngine]] = {
    "hooks": OpacusHooksEngine,
    "functorch": OpacusHooksEngine,
    "ghost": GhostClippingEngine,
    "bk": BookKeepingEngine,
    "auto": OpacusHooksEngine,  # checked as its fallback until the module is known (see resolved_mode)
}


def engine_class(mode: GradSampleMode) -> type[ClippingEngine]:
    """The engine of ``grad_sample_mode=mode`` (its class: options and precision are checked before it is built)."""
    return _ENGINES[mode]


def resolved_mode(mode: GradSampleMode, module: nn.Module, *, sensitivity_probe: bool) -> GradSampleMode:
    """The engine ``mode`` stands for on ``module``: ``"auto"`` is ``"bk"`` where book-keeping can clip every trainable
    layer (no tied parameters, a rule for every layer) and no option needs per-example gradients, else ``"hooks"``.

    Examples:
        >>> resolved_mode("auto", nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), sensitivity_probe=False)
        'bk'
        >>> resolved_mode("auto", nn.Linear(3, 4), sensitivity_probe=True)
        'hooks'
    """
    if mode != "auto":
        return mode
    chosen: GradSampleMode = "bk"
    if sensitivity_probe and not BookKeepingEngine.supports_sensitivity_probe:
        chosen, reason = "hooks", "sensitivity_probe=True needs per-example gradients"
    else:
        try:
            layers_of(module)
            reason = "it can clip every trainable layer"
        except ValueError as error:
            chosen, reason = "hooks", str(error)
    rank_zero_info(f"DPStrategy: grad_sample_mode='auto' clips with {chosen!r}: {reason}")
    return chosen


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
