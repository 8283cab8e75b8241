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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nt.sharpness.hvp import flatten

__all__ = ["StabilityThreshold", "adam_preconditioner", "stability_threshold"]

ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW)


@dataclass(frozen=True)
class StabilityThreshold:
    """Threshold for the (preconditioned, if ``preconditioned``) top Hessian eigenvalue."""

    value: float
    preconditioned: bool
    rule: str


def stability_threshold(optimizer: torch.optim.Optimizer) -> StabilityThreshold | None:
    """The threshold of ``optimizer`` from its first param group, or ``None`` for optimizers without a known rule.

    Examples:
        >>> w = torch.zeros(1, requires_grad=True)
        >>> round(stability_threshold(torch.optim.SGD([w], lr=0.1, momentum=0.9)).value, 9)
        38.0
    """
    group = optimizer.param_groups[0]
    lr = float(group["lr"])
    if isinstance(optimizer, torch.optim.SGD):
        beta, dampening = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0))
        decay = float(group.get("weight_decay", 0.0))
        if beta == 0.0:
            return StabilityThreshold(2.0 / lr - decay, False, "SGD: 2/lr")
        if group.get("nesterov", False):
            return StabilityThreshold(
                2 * (1 + beta) / ((1 + 2 * beta) * lr) - decay, False, "Nesterov: 2(1+b)/((1+2b)lr)"
            )
        return StabilityThreshold(2 * (1 + beta) / ((1 - dampening) * lr) - decay, False, "heavy ball: 2(1+b)/lr")
    if isinstance(optimizer, ADAM_FAMILY):
        beta1 = float(group["betas"][0])
        return StabilityThreshold((2 + 2 * beta1) / ((1 - beta1) * lr), True, "Adam: (2+2b1)/((1-b1)lr)")
    return None


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> Tensor | None:
    """Adam's diagonal ``P`` for ``params`` as one flat vector, or ``None`` before the first step."""
    pieces = []
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                return None
            step = float(state["step"])
            second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
            diagonal = (1 - beta1**step) * ((second / (1 - beta2**step)).sqrt() + group["eps"])
            pieces.append((p, diagonal))
    by_param = {id(p): diagonal for p, diagonal in pieces}
    if any(id(p) not in by_param for p in params):
        return None
    return flatten([by_param[id(p)].float() for p in params])
