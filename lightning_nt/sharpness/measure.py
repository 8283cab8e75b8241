"""Landscape measurements built on Hessian-vector products: trace, batch sharpness, Santurkar smoothness.

All functions take plain tensors and closures, so they run without Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nt.common.validation import check_choice
from lightning_nt.sharpness.hvp import HessianOperator, flatten, unflatten

__all__ = [
    "Smoothness",
    "TraceEstimate",
    "batch_sharpness",
    "hutchinson_trace",
    "preconditioned",
    "smoothness_along_gradient",
]


def preconditioned(matvec: Callable[[Tensor], Tensor], diagonal: Tensor) -> Callable[[Tensor], Tensor]:
    """``x -> P^-1/2 H P^-1/2 x`` for a positive diagonal ``P``: symmetric, with the eigenvalues of ``P^-1 H``."""
    scale = diagonal.rsqrt()
    return lambda x: scale * matvec(scale * x)


@dataclass(frozen=True)
class TraceEstimate:
    """What :func:`hutchinson_trace` returns: the trace estimate, its standard error over the random probes, and
    the Hessian-vector products it cost."""

    value: float
    standard_error: float
    num_matvecs: int


def hutchinson_trace(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    samples: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    method: str = "hutchinson",
    dtype: torch.dtype = torch.float32,
) -> TraceEstimate:
    """Trace of a symmetric operator from Rademacher probes: Hutchinson, or Hutch++ (Meyer et al. 2021).

    Hutch++ spends a third of the products on a sketch ``Q = orth(A S)`` whose trace ``tr(Q^T A Q)`` is exact,
    and the rest on Hutchinson for the deflated remainder; the standard error is that of the remainder.

    The probes are drawn on the CPU from ``generator`` (the same ones on any device) and handed to ``matvec``
    on ``device`` in ``dtype``.

    Examples:
        >>> A = torch.diag(torch.arange(1.0, 11.0))
        >>> round(hutchinson_trace(lambda v: A @ v, 10, samples=30, method="hutch++").value, 3)
        55.0
    """
    check_choice("method", method, ("hutchinson", "hutch++"))

    def rademacher(count: int) -> Tensor:
        signs = torch.randint(0, 2, (count, dim), generator=generator).to(device=device, dtype=dtype)
        return 2 * signs - 1

    exact, basis, used = 0.0, None, 0
    if method == "hutch++":
        sketch_size = max(1, samples // 3)
        sketch = torch.stack([matvec(s) for s in rademacher(sketch_size)], dim=1)
        basis, _ = torch.linalg.qr(sketch)
        exact = sum(float(q @ matvec(q)) for q in basis.T)
        used = 2 * sketch_size
    remaining = max(samples - used, 2)
    values = []
    for probe in rademacher(remaining):
        if basis is not None:
            probe = probe - basis @ (basis.T @ probe)
        values.append(float(probe @ matvec(probe)))
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return TraceEstimate(exact + mean, spread / math.sqrt(len(values)), used + remaining)


def batch_sharpness(operators: Iterable[HessianOperator]) -> float:
    """Andreyev & Beneventano's batch sharpness: the mean over mini-batches of ``g_B^T H_B g_B / ||g_B||^2``.

    Each operator is the Hessian of one mini-batch loss; its own gradient gives the direction.
    """
    values = []
    for operator in operators:
        gradient = operator.gradient()
        values.append(float(gradient @ operator.matvec(gradient)) / max(float(gradient @ gradient), 1e-30))
        operator.release()
    if not values:
        raise ValueError("batch_sharpness needs at least one mini-batch.")
    return sum(values) / len(values)


@dataclass(frozen=True)
class Smoothness:
    """Santurkar et al. (2018) along the gradient, over the step sizes tried."""

    loss_range: float
    """max - min of the loss at ``w - eta g`` over the step sizes (and eta = 0)."""
    grad_predictiveness: float
    """max over step sizes of ``||grad L(w - eta g) - grad L(w)||``."""
    beta: float
    """max over step sizes of ``||grad L(w - eta g) - grad L(w)|| / ||eta g||`` (effective beta-smoothness)."""


def smoothness_along_gradient(
    params: Sequence[Tensor],
    loss_and_gradient: Callable[[], tuple[float, Tensor]],
    step_sizes: Sequence[float],
) -> Smoothness:
    """Move ``params`` to ``w - eta g`` for each step size, measure, and put them back exactly.

    ``loss_and_gradient()`` returns the loss and the flat gradient at the parameters' current values.
    """
    origin = [p.detach().clone() for p in params]
    loss0, gradient = loss_and_gradient()
    losses, changes, betas = [loss0], [], []
    try:
        for eta in step_sizes:
            with torch.no_grad():
                for p, start, g in zip(params, origin, unflatten(gradient, params)):
                    p.copy_(start - eta * g.to(p.dtype))
            loss, moved_gradient = loss_and_gradient()
            change = float((moved_gradient - gradient).norm())
            losses.append(loss)
            changes.append(change)
            betas.append(change / max(eta * float(gradient.norm()), 1e-30))
    finally:
        with torch.no_grad():
            for p, start in zip(params, origin):
                p.copy_(start)
    return Smoothness(max(losses) - min(losses), max(changes), max(betas))


def flat_norm(params: Sequence[Tensor]) -> float:
    """Euclidean norm of all parameters together."""
    return float(flatten([p.detach() for p in params]).norm())
