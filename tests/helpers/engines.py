"""A DP clipping engine without noise, for tests that compare one private step with a per-example reference."""

from __future__ import annotations

import torch
from torch import nn

from lightning_nt.privacy.engines import ClippingEngine, clipping_engine


def noiseless_engine(mode: str, module: nn.Module, max_grad_norm: float, batch_size: int) -> ClippingEngine:
    """The engine of ``grad_sample_mode=mode`` on ``module``, with SGD at lr 1 over its trainable parameters and no
    noise: one step's update is minus the sum of the clipped per-example gradients over ``batch_size``."""
    engine = clipping_engine(
        mode,
        module,
        torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0),
        max_grad_norm=max_grad_norm,
        noise_multiplier=0.0,
        secure_mode=False,
        views=1,
        distributed=False,
    )
    engine.optimizer.expected_batch_size = batch_size
    return engine
