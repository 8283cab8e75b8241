"""Lanczos with full reorthogonalisation for the extreme eigenvalues of a symmetric linear operator.

Only ``matvec`` is needed, so the same solver serves the Hessian, the preconditioned Hessian of Adam
and any test matrix. The Krylov basis is kept (fp32 vectors, fp64 tridiagonal) and every new vector
is orthogonalised against it twice, so Ritz values do not repeat ("ghosts") and a pair can be trusted
once its residual ``|beta_m s_m|`` is small. Warm starts take the previous Ritz vectors plus a small
random perturbation: an exact eigenvector alone would make the Krylov space collapse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LanczosResult", "lanczos", "warm_start"]


@dataclass
class LanczosResult:
    """Top-k eigenpairs (descending) and the smallest eigenpair of a symmetric operator."""

    eigenvalues: Tensor
    """Largest algebraic eigenvalues, descending, float64."""
    eigenvectors: Tensor
    """Unit Ritz vectors, one per row, matching ``eigenvalues``."""
    lambda_min: float
    vector_min: Tensor
    residuals: Tensor
    """Ritz residual norms ``||A y - theta y||`` of the top-k pairs."""
    num_matvecs: int
    converged: bool


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    k: int = 1,
    tol: float = 1e-3,
    max_iter: int = 100,
    smallest: bool = True,
) -> LanczosResult:
    """Run Lanczos from ``start`` until the ``k`` largest (and, if asked, the smallest) Ritz pairs converge.

    A pair has converged when its residual is at most ``tol`` times the largest Ritz value in magnitude.
    Raises ``FloatingPointError`` if the operator returns NaN or inf.

    Examples:
        >>> A = torch.diag(torch.tensor([3.0, -2.0, 1.0, 0.5]))
        >>> result = lanczos(lambda v: A @ v, torch.ones(4), k=2)
        >>> [round(x, 6) for x in result.eigenvalues.tolist()], round(result.lambda_min, 6)
        ([3.0, 1.0], -2.0)
    """
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    dim = start.numel()
    max_iter = min(max_iter, dim)
    basis = torch.empty(max_iter, dim, dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta = vectors = torch.empty(0, dtype=torch.float64)
    beta = 0.0
    converged = False
    for j in range(max_iter):
        w = matvec(basis[j])
        alphas.append(float(w @ basis[j]))
        active = basis[: j + 1]
        for _ in range(2):  # "twice is enough"
            w = w - active.T @ (active @ w)
        beta = float(w.norm())
        if not (math.isfinite(alphas[-1]) and math.isfinite(beta)):
            raise FloatingPointError(f"The operator returned a non-finite vector at Lanczos step {j + 1}.")
        theta, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        scale = max(abs(float(theta[0])), abs(float(theta[-1])), torch.finfo(torch.float64).tiny)
        wanted = list(range(max(0, j + 1 - k), j + 1)) + ([0] if smallest else [])
        residuals = beta * vectors[-1, wanted].abs()
        exhausted = beta <= 1e-10 * scale
        if exhausted or (j + 1 >= min(k, dim) and bool((residuals <= tol * scale).all())):
            converged = True
            break
        if j + 1 < max_iter:
            betas.append(beta)
            basis[j + 1] = w / beta
    steps = len(alphas)
    ritz = vectors.to(basis.dtype).T @ basis[:steps]
    top = min(k, steps)
    order = torch.arange(steps - 1, steps - 1 - top, -1)
    return LanczosResult(
        eigenvalues=theta[order],
        eigenvectors=ritz[order],
        lambda_min=float(theta[0]),
        vector_min=ritz[0],
        residuals=beta * vectors[-1, order].abs(),
        num_matvecs=steps,
        converged=converged,
    )


def warm_start(previous: Sequence[Tensor], noise: float = 0.01, generator: torch.Generator | None = None) -> Tensor:
    """Start vector from previous unit Ritz vectors: their sum plus a random perturbation of relative size ``noise``."""
    total = torch.stack(list(previous)).sum(0)
    perturbation = torch.randn(total.shape, generator=generator, dtype=total.dtype).to(total.device)
    return total / total.norm() + noise * perturbation / perturbation.norm()


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    matrix = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        matrix += torch.diag(off, 1) + torch.diag(off, -1)
    return matrix
