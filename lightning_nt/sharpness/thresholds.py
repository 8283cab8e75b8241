"""The edge-of-stability threshold of the optimizer a run is using, read from its live state.

On a quadratic with curvature ``lam`` the iteration of each optimizer is stable iff ``lam`` is below:

* SGD: ``2 / lr``;
* heavy-ball momentum ``beta`` (PyTorch ``SGD(momentum=beta)``, dampening ``d``): ``2 (1 + beta) / ((1 - d) lr)``;
* Nesterov (PyTorch ``nesterov=True``): the update is ``p <- p - lr ((1 + beta) g + beta^2 v)`` with
  ``v <- beta v + g``; on ``g = lam p`` the pair ``(p, v)`` evolves by a 2x2 matrix with trace
  ``1 + beta - lr (1 + beta) lam`` and determinant ``beta (1 - lr lam)``, whose eigenvalue leaves the unit
  disc through ``-1`` when ``1 + trace + det = 0``, i.e. at ``lam = 2 (1 + beta) / ((1 + 2 beta) lr)``;
* SGD's coupled ``weight_decay`` adds itself to every curvature, so the threshold on the loss's own
  Hessian is lowered by it;
* Adam/AdamW (Cohen et al. 2022): the preconditioned sharpness ``lambda_1(P^-1/2 H P^-1/2)`` with
  ``P = (1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps)`` against ``(2 + 2 beta1) / ((1 - beta1) lr)``
  (38 / lr for beta1 = 0.9).

At ``lr = 0`` every threshold is ``inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nt.sharpness.hvp import flatten

__all__ = [
    "StabilityThreshold",
    "adam_preconditioner",
    "coupled_weight_decays",
    "learning_rate_ratios",
    "stability_threshold",
    "without_adam_state",
]

ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW)


@dataclass(frozen=True)
class StabilityThreshold:
    """Threshold for the (preconditioned, if ``preconditioned``) top Hessian eigenvalue."""

    value: float
    preconditioned: bool
    rule: str


def stability_threshold(optimizer: torch.optim.Optimizer) -> StabilityThreshold | None:
    """The threshold of ``optimizer`` from its first param group, or ``None`` for optimizers without a known rule.

    At ``lr = 0`` (the first step of a warm-up schedule) nothing is unstable: the threshold is ``inf``.

    Examples:
        >>> w = torch.zeros(1, requires_grad=True)
        >>> round(stability_threshold(torch.optim.SGD([w], lr=0.1, momentum=0.9)).value, 9)
        38.0
        >>> stability_threshold(torch.optim.SGD([w], lr=0.0)).value
        inf
    """
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if isinstance(optimizer, torch.optim.SGD):
        beta, dampening = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
        decay = float(group.get("weight_decay", 0.0))
        if beta == 0.0:
            return StabilityThreshold(_over(2.0, lr) - decay, False, "SGD: 2/lr")
        if group.get("nesterov", False):
            return StabilityThreshold(
                _over(2 * (1 + beta) / (1 + 2 * beta), lr) - decay, False, "Nesterov: 2(1+b)/((1+2b)lr)"
            )
        return StabilityThreshold(_over(2 * (1 + beta) / (1 - dampening), lr) - decay, False, "heavy ball: 2(1+b)/lr")
    if isinstance(optimizer, ADAM_FAMILY):
        beta1 = float(group["betas"][0])
        return StabilityThreshold(_over((2 + 2 * beta1) / (1 - beta1), lr), True, "Adam: (2+2b1)/((1-b1)lr)")
    return None


def _over(numerator: float, lr: float) -> float:
    """``numerator / lr``, and ``inf`` at ``lr = 0``: a step of size zero is stable at any curvature."""
    return numerator / lr if lr != 0 else math.inf


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """Adam's diagonal ``P`` for ``params`` as one flat vector, or ``None`` before the first step.

    A parameter the optimizer holds no state for (unused by the loss, added to the optimizer late, or not in it)
    does not move, so it has no place in the preconditioned operator: its entries are ``inf`` (``P^-1/2 = 0``),
    which leaves it out of ``P^-1/2 H P^-1/2``. :func:`without_adam_state` lists them. The vector is on the
    parameters' device, in their dtype promoted to at least fp32.
    """
    missing = set(without_adam_state(optimizer, params))
    if len(missing) == len(params):
        return None
    settings = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    pieces = []
    for index, p in enumerate(params):
        dtype = torch.promote_types(p.dtype, torch.float32)
        if index in missing:
            pieces.append(torch.full(p.shape, math.inf, dtype=dtype, device=p.device))
            continue
        group, state = settings[id(p)], optimizer.state[p]
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        pieces.append(((1 - beta1**step) * ((second / (1 - beta2**step)).sqrt() + group["eps"])).to(dtype))
    return flatten(pieces)


def without_adam_state(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[int]:
    """Indices of the ``params`` for which ``optimizer`` holds no second-moment estimate (yet)."""
    return [index for index, p in enumerate(params) if "exp_avg_sq" not in optimizer.state.get(p, {})]


def learning_rate_ratios(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """Each parameter's learning rate over group 0's, as one flat vector; ``None`` when all groups share group 0's.

    With per-group learning rates ``R lr_0`` the step on a quadratic is ``w <- w - lr_0 R H w``: stable while the
    eigenvalues of ``R H``, those of ``R^1/2 H R^1/2``, stay below the threshold of ``lr_0``. A parameter outside the
    optimizer does not move (ratio 0). ``None`` too at ``lr_0 = 0``, where the threshold is ``inf`` anyway.

    Examples:
        >>> a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
        >>> learning_rate_ratios(torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.05}]), [a, b])
        tensor([1.0000, 1.0000, 0.5000])
    """
    first = float(optimizer.param_groups[0]["lr"])
    rates = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    if first == 0 or all(rate == first for rate in rates.values()):
        return None
    return _per_parameter({key: rate / first for key, rate in rates.items()}, params)


def coupled_weight_decays(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """Each parameter's SGD ``weight_decay`` as one flat vector; ``None`` when all groups share group 0's (or for
    another optimizer).

    SGD's coupled decay adds ``weight_decay * w`` to the gradient: on a quadratic the step is ``w <- w - lr_0 R (H +
    D) w`` with ``D`` these decays, stable while the eigenvalues of ``R^1/2 (H + D) R^1/2`` stay below the threshold of
    ``lr_0`` without decay. A parameter outside the optimizer has decay 0.

    Examples:
        >>> a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
        >>> groups = [{"params": [a], "weight_decay": 0.01}, {"params": [b], "weight_decay": 0.0}]
        >>> coupled_weight_decays(torch.optim.SGD(groups, lr=0.1), [a, b])
        tensor([0.0100, 0.0100, 0.0000])
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return None
    decays = {id(p): float(group.get("weight_decay", 0.0)) for group in optimizer.param_groups for p in group["params"]}
    first = float(optimizer.param_groups[0].get("weight_decay", 0.0))
    if all(decay == first for decay in decays.values()):
        return None
    return _per_parameter(decays, params)


def _per_parameter(values: dict[int, float], params: Sequence[Tensor]) -> Tensor:
    """``values[id(p)]`` (0 for a parameter not in it) repeated over each parameter's entries, as one flat vector on
    the parameters' device, in their dtype promoted to at least fp32."""
    return flatten(
        [
            torch.full(
                p.shape, values.get(id(p), 0.0), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device
            )
            for p in params
        ]
    )
