"""Lanczos with full reorthogonalisation for the extreme eigenvalues of a symmetric linear operator.

Only ``matvec`` is needed, so the same solver serves the Hessian, the preconditioned Hessian of Adam
and any test matrix. The Krylov basis is kept (vectors on the start vector's device and in its dtype, an fp64
tridiagonal on the CPU) and every new vector is orthogonalised against it twice, so Ritz values do not repeat
("ghosts") and a pair can be trusted once its residual ``|beta_m s_m|`` is small. Warm starts take the previous
Ritz vectors plus a small random perturbation: an exact eigenvector alone would make the Krylov space collapse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_nt.common.validation import at_least, between, checked_arguments

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


@checked_arguments(k=at_least(1), tol=between(0, 1, low_open=True, high_open=True), max_iter=at_least(1))
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
    Raises ``FloatingPointError`` if the operator returns NaN or inf. Every vector lives on ``start``'s device
    in ``start``'s dtype; only the small tridiagonal problem is solved on the CPU in float64.

    Memory: the Krylov basis grows in blocks of ``BLOCK`` (16) vectors as the iteration needs them (not
    ``max_iter`` up front), so a solve that stops after ``m`` steps holds at most ``m + BLOCK - 1`` basis vectors,
    plus the product, its residual and the ``k + 1`` Ritz vectors returned: about ``m + k + 20`` vectors of
    ``start``'s size at the peak.

    Examples:
        >>> A = torch.diag(torch.tensor([3.0, -2.0, 1.0, 0.5]))
        >>> result = lanczos(lambda v: A @ v, torch.ones(4), k=2)
        >>> [round(x, 6) for x in result.eigenvalues.tolist()], round(result.lambda_min, 6)
        ([3.0, 1.0], -2.0)
    """
    basis = _Basis(start / start.norm(), min(max_iter, start.numel()))
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    converged = False
    while True:
        q = basis.last()
        w = matvec(q)
        alphas.append(float(w @ q))
        w = basis.orthogonalise(w)
        beta = float(w.norm())
        if not (math.isfinite(alphas[-1]) and math.isfinite(beta)):
            raise FloatingPointError(f"The operator returned a non-finite vector at Lanczos step {len(alphas)}.")
        theta, vectors = torch.linalg.eigh(_tridiagonal(alphas, betas))
        steps = len(alphas)
        scale = max(abs(float(theta[0])), abs(float(theta[-1])), torch.finfo(torch.float64).tiny)
        wanted = list(range(max(0, steps - k), steps)) + ([0] if smallest else [])
        residuals = beta * vectors[-1, wanted].abs()
        exhausted = beta <= 1e-10 * scale
        if exhausted or (steps >= min(k, basis.capacity) and bool((residuals <= tol * scale).all())):
            converged = True
            break
        if steps == basis.capacity:
            break
        betas.append(beta)
        basis.append(w / beta)
    top = list(range(steps - 1, steps - 1 - min(k, steps), -1))
    ritz = basis.combine(vectors[:, [*top, 0]])
    return LanczosResult(
        eigenvalues=theta[top],
        eigenvectors=ritz[:-1],
        lambda_min=float(theta[0]),
        vector_min=ritz[-1],
        residuals=beta * vectors[-1, top].abs(),
        num_matvecs=steps,
        converged=converged,
    )


BLOCK = 16
"""Basis vectors allocated at a time: memory follows the steps taken, matrix products stay blocked."""


class _Basis:
    """Orthonormal Krylov vectors stored in blocks of ``BLOCK`` rows, grown on demand."""

    def __init__(self, first: Tensor, capacity: int) -> None:
        self.capacity = capacity
        self.numel, self.dtype, self.device = first.numel(), first.dtype, first.device
        self.blocks: list[Tensor] = []
        self.size = 0
        self.append(first.reshape(-1))

    def append(self, vector: Tensor) -> None:
        row = self.size % BLOCK
        if row == 0:
            rows = min(BLOCK, self.capacity - self.size)
            self.blocks.append(torch.empty(rows, self.numel, dtype=self.dtype, device=self.device))
        self.blocks[-1][row] = vector
        self.size += 1

    def last(self) -> Tensor:
        return self.blocks[-1][(self.size - 1) % BLOCK]

    def _filled(self) -> list[Tensor]:
        return [*self.blocks[:-1], self.blocks[-1][: (self.size - 1) % BLOCK + 1]]

    def orthogonalise(self, w: Tensor) -> Tensor:
        """``w`` minus its projection on the basis, twice ("twice is enough")."""
        for _ in range(2):
            for block in self._filled():
                w = w - block.T @ (block @ w)
        return w

    def combine(self, coefficients: Tensor) -> Tensor:
        """``coefficients.T @ basis``: one row per column of ``coefficients`` (``size`` rows, any device and dtype)."""
        coefficients = coefficients.to(device=self.device, dtype=self.dtype)
        result = torch.zeros(coefficients.shape[1], self.numel, dtype=self.dtype, device=self.device)
        start = 0
        for block in self._filled():
            result += coefficients[start : start + len(block)].T @ block
            start += len(block)
        return result


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
