"""A deep ReLU network without normalisation that can't train from its initialisation: what GradInit repairs.

GradInit's point (Zhu et al. 2021) is that a network without normalisation layers trains or fails depending on
the scale of its initial weights, and that the right scales can be learned in a few hundred cheap iterations.
:class:`DeepDigitsMLP` is such a network on the 8x8 digits: ``depth`` ReLU layers initialised ``gain`` times
larger than He (Kaiming) initialisation, so the signal grows ``gain ** depth``-fold (4096-fold with the
defaults) and the first SGD steps blow the loss up to NaN; it never trains. GradInit shrinks every layer, and
the same training then reaches high accuracy (``tests/gradinit/test_science.py``).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from lightning_nt.common.validation import above, at_least, between, checked_arguments
from lightning_nt.demos.digits import DigitsClassifier, LossName, OptimizerName

__all__ = ["DeepDigitsMLP"]


class DeepDigitsMLP(DigitsClassifier):
    """A ``depth``-layer ReLU MLP on the flattened digits, no normalisation, He initialisation times ``gain``.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (and ``test/*``). The weights are drawn from
    the global RNG (``pl.seed_everything``), the biases are zero.

    Args:
        depth: linear layers (the last one is the classifier).
        width: units of each hidden layer.
        gain: multiplies He initialisation; > 1 makes the signal explode with depth.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: decoupled for AdamW, L2 for the others.
        loss: ``"cross_entropy"`` or ``"mse"`` (half squared error to one-hot targets).

    Examples:
        >>> net = DeepDigitsMLP(depth=4, width=8)
        >>> net(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    @checked_arguments(depth=at_least(2), width=at_least(1), gain=above(0), lr=above(0), momentum=between(0, 1))
    def __init__(
        self,
        depth: int = 12,
        width: int = 64,
        gain: float = 2.0,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.02,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        loss: LossName = "cross_entropy",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        sizes = [64] + [width] * (depth - 1)
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.network = nn.Sequential(*layers, nn.Linear(sizes[-1], 10))
        with torch.no_grad():
            for layer in self.network:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu").mul_(gain)
                    nn.init.zeros_(layer.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.network(images)
