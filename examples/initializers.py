"""Initialisers that ``SubspaceTraining(initializer=...)`` takes, named by import path in a LightningCLI YAML config.

``theta0``, the point the random subspace passes through, is what each layer's own ``reset_parameters`` draws from
the subspace's seed, unless ``initializer`` (a function that initialises one module, like a Hugging Face model's
``_init_weights``) is given: it then runs on every submodule instead. A compression bound's decoder draws
``theta0`` again from the seed, so an initializer must draw from torch's global generator (which SubspaceTraining
seeds) and set every parameter of each module it is given.

    python examples/cli.py fit --config examples/configs/subspace.yaml
"""

from __future__ import annotations

from torch import nn

__all__ = ["he_normal"]

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def he_normal(module: nn.Module) -> None:
    """He et al. (2015) for ReLU networks: a linear or convolutional layer's weights from ``N(0, 2 / fan_in)`` and a
    zero bias; any other module with ``reset_parameters`` (a normalisation layer) its own initialisation.

    Examples:
        >>> layer = nn.Linear(400, 300)
        >>> he_normal(layer)
        >>> round(float(layer.weight.std()), 2), float(layer.bias.abs().max())
        (0.07, 0.0)
    """
    if isinstance(module, _WEIGHTED):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif callable(getattr(module, "reset_parameters", None)):
        module.reset_parameters()
