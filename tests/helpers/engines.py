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


class NoPrecision:
    """The precision plugin's two backward hooks, without a Trainer."""

    def pre_backward(self, tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return tensor

    def post_backward(self, tensor: torch.Tensor, module: nn.Module) -> torch.Tensor:
        return tensor


def noiseless_update(
    mode: str, module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, max_grad_norm: float
) -> dict[str, torch.Tensor]:
    """One noiseless private step of ``module`` on the cross-entropy of ``(inputs, labels)`` under ``mode``: the
    change of every trainable parameter, by name (minus the clipped sum over the batch, at lr 1)."""
    before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    engine = noiseless_engine(mode, module, max_grad_norm, len(inputs))
    engine.start()
    engine.discard_per_example_state()
    output = engine.take_output(torch.nn.functional.cross_entropy(module(inputs), labels))
    engine.backward(output, output.backward, len(inputs), NoPrecision())
    engine.optimizer.step()
    engine.stop()
    engine.forget()
    return {name: module.get_parameter(name).detach() - value for name, value in before.items()}
