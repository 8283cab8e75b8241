"""GradInit (Zhu et al., NeurIPS 2021) for any module, without Lightning.

One scale ``alpha_i`` per parameter tensor, ``theta_i = alpha_i * theta0_i``, learned so that one step
of the chosen optimizer lowers the loss most, under a gradient-norm constraint. Each iteration:

1. two half-batches ``B0, B1``; ``g = grad L(B0 u B1; alpha theta0)``; ``n = ||g||_2`` (SGD) or ``||g||_1`` (Adam);
2. if ``n > gamma`` (constraint branch): take a scale step on ``dn/dalpha`` (double backward);
3. else (objective branch): the optimizer's first step ``s = eta g / ||g||_2`` (SGD, normalised), ``eta g`` (SGD)
   or ``eta sign(g)`` (Adam), detached; a new half-batch ``B2``; a scale step on
   ``d/dalpha [L(B0 u B2; alpha theta0 - s) / eta]`` (first order: ``s`` is a constant);
4. clamp: weights' scales >= ``min_scale`` (and <= ``max_scale``), biases' >= 0.

The scales are optimised by a scalar Adam as in the official ``RescaleAdam``: gradients clipped to
``+-grad_clip``, separate first moments for constraint and objective steps, one shared second moment.
Parameters are never modified during the search (``torch.func.functional_call`` substitutes
``alpha * theta0``); :func:`apply_scales` multiplies each tensor in place at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_nt.common.batches import concatenate_batches
from lightning_nt.common.state import preserved_modes
from lightning_nt.common.validation import check_choice

__all__ = ["GradInitResult", "ScaleAdam", "apply_scales", "gradinit", "search_mode"]

Algorithm = Literal["sgd", "adam"]
LossOf = Callable[[nn.Module, Any], Tensor]
"""``loss_of(module, batch)``: the scalar loss the module's own training computes on ``batch``."""


class ScaleAdam:
    """Scalar Adam over the vector of scales, with the official GradInit moment handling.

    Args:
        lower: per-scale lower bounds (``min_scale`` for weights, 0 for biases).
        upper: per-scale upper bounds (``inf`` for none).
        frozen: scales that never move (tensors of zero norm).
    """

    def __init__(
        self,
        lower: Tensor,
        upper: Tensor,
        frozen: Tensor,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        grad_clip: float = 1.0,
    ) -> None:
        self.lower, self.upper, self.frozen = lower, upper, frozen
        self.lr, self.betas, self.eps, self.grad_clip = lr, betas, eps, grad_clip
        zeros = torch.zeros_like(lower)
        self.objective_avg, self.constraint_avg, self.avg_sq = zeros.clone(), zeros.clone(), zeros.clone()
        self.objective_steps = self.constraint_steps = 0

    def step(self, scales: Tensor, grad: Tensor, constraint: bool) -> Tensor:
        """Return the updated scales for the gradient ``grad`` of a constraint or an objective step."""
        beta1, beta2 = self.betas
        if self.grad_clip > 0:
            grad = grad.clamp(-self.grad_clip, self.grad_clip)
        if constraint:
            self.constraint_steps += 1
            self.constraint_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            steps, avg = self.constraint_steps, self.constraint_avg
        else:
            self.objective_steps += 1
            self.objective_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            steps, avg = self.objective_steps, self.objective_avg
        self.avg_sq.mul_(beta2).add_(grad * grad, alpha=1 - beta2)
        correction2 = 1 - beta2 ** (self.constraint_steps + self.objective_steps)
        denominator = (self.avg_sq / correction2).sqrt() + self.eps
        updated = scales - self.lr / (1 - beta1**steps) * avg / denominator
        updated = torch.minimum(torch.maximum(updated, self.lower), self.upper)
        return torch.where(self.frozen, scales, updated)


@dataclass
class GradInitResult:
    """What a GradInit search found."""

    scales: dict[str, float]
    lookahead_losses: list[float] = field(default_factory=list)
    """Look-ahead loss ``L(S; theta - s)`` of every objective iteration."""
    grad_norms: list[float] = field(default_factory=list)
    """Gradient norm of every iteration."""
    constraint_iterations: int = 0
    diverged: bool = False


@contextmanager
def search_mode(module: nn.Module) -> Iterator[None]:
    """Dropout off, BatchNorm on batch statistics without touching its running statistics, math attention.

    PyTorch's fused scaled-dot-product attention kernels have no double backward on the CPU; the math
    kernel has, so the constraint branch works for attention layers too.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    tracking = [norm.track_running_stats for norm in norms]
    with preserved_modes(module), sdpa_kernel(SDPBackend.MATH):
        module.eval()
        for norm in norms:
            norm.training, norm.track_running_stats = True, False
        try:
            yield
        finally:
            for norm, track in zip(norms, tracking):
                norm.track_running_stats = track


def gradinit(
    module: nn.Module,
    loss_of: LossOf,
    batches: Iterator[Any],
    *,
    iterations: int = 390,
    lr: float = 1e-2,
    eta: float = 0.1,
    gamma: float = 1.0,
    algorithm: Algorithm = "sgd",
    normalize_grad: bool = True,
    min_scale: float = 0.01,
    max_scale: float | None = None,
    grad_clip: float = 1.0,
    batch_overlap: bool = True,
    second_order: bool = False,
    concatenate: Callable[[Sequence[Any]], Any] | None = None,
    reduce_mean: Callable[[Tensor], Tensor] | None = None,
    progress: Callable[[int, GradInitResult], None] | None = None,
) -> GradInitResult:
    """Search one scale per parameter tensor of ``module``; the module is not modified (see :func:`apply_scales`).

    Runs in :func:`search_mode` (dropout off, BatchNorm on batch statistics without updating them), in fp32.

    Args:
        module: the network; its parameters that require grad get a scale each (tied parameters once).
        loss_of: ``loss_of(module, batch) -> scalar``, called on ``module`` with substituted parameters.
        batches: an endless iterator of half-batches (the loader's batches).
        iterations: search iterations.
        lr: learning rate of the scalar Adam over the scales.
        eta: learning rate of the optimizer whose first step is simulated.
        gamma: gradient-norm constraint.
        algorithm: ``"sgd"`` or ``"adam"``: the optimizer whose first step is simulated.
        normalize_grad: SGD variant: step ``eta g / ||g||_2`` instead of ``eta g``.
        min_scale: lower bound for the scales of weights (biases' are >= 0).
        max_scale: upper bound for the scales of weights, if any.
        grad_clip: clip of each scalar gradient.
        batch_overlap: the look-ahead batch shares half its examples with the gradient batch (official default).
        second_order: backpropagate through the step ``s`` too (the paper's full objective; slower).
        concatenate: joins half-batches into one batch (default: ``torch.cat`` on every tensor of the batch).
        reduce_mean: averages a tensor over processes (data parallelism), so every process gets the same scales.
        progress: called after every iteration with its index and the result so far.

    Examples:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> data = iter(lambda: (torch.randn(8, 4), torch.randint(2, (8,))), None)
        >>> loss_of = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
        >>> result = gradinit(net, loss_of, data, iterations=5)
        >>> sorted(result.scales) == sorted(n for n, _ in net.named_parameters())
        True
    """
    check_choice("algorithm", algorithm, ("sgd", "adam"))
    join = concatenate or concatenate_batches
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    originals = dict(module.named_parameters())
    theta0 = [originals[name].detach().float() for name in names]
    norms = torch.stack([t.norm() for t in theta0])
    is_bias = torch.tensor([name.split(".")[-1].startswith("bias") for name in names])
    lower = torch.where(is_bias, torch.tensor(0.0), torch.tensor(float(min_scale)))
    upper = torch.full((len(names),), math.inf)
    if max_scale is not None:
        upper = torch.where(is_bias, upper, torch.tensor(float(max_scale)))
    device = theta0[0].device
    optimizer = ScaleAdam(lower.to(device), upper.to(device), (norms == 0).to(device), lr=lr, grad_clip=grad_clip)
    scales = torch.ones(len(names), device=device)
    result = GradInitResult(scales={})

    def loss_at(weights: Sequence[Tensor], batch: Any) -> Tensor:
        return loss_of_substituted(module, loss_of, dict(zip(names, weights)), batch).float()

    with search_mode(module), torch.enable_grad():
        for iteration in range(iterations):
            alpha = scales.clone().requires_grad_(True)
            weights = [a * t for a, t in zip(alpha, theta0)]
            half0, half1 = next(batches), next(batches)
            loss = loss_at(weights, join([half0, half1]))
            grads = torch.autograd.grad(loss, weights, create_graph=True)
            if algorithm == "adam":
                norm = sum(g.abs().sum() for g in grads)
            else:
                norm = torch.sqrt(sum(g.square().sum() for g in grads))
            decided_norm = float(_mean(norm.detach(), reduce_mean))
            result.grad_norms.append(decided_norm)
            if not math.isfinite(decided_norm) or not math.isfinite(float(loss.detach())):
                result.diverged = True
                break
            constraint = decided_norm > gamma
            if constraint:
                (scale_grad,) = torch.autograd.grad(norm, alpha)
                result.constraint_iterations += 1
            else:
                if algorithm == "adam":
                    steps = [eta * g.sign() for g in grads]
                else:
                    steps = [eta * g / norm for g in grads] if normalize_grad else [eta * g for g in grads]
                if not second_order:
                    steps = [s.detach() for s in steps]
                half2 = next(batches)
                first = half0 if batch_overlap else next(batches)
                lookahead = loss_at([w - s for w, s in zip(weights, steps)], join([first, half2]))
                (scale_grad,) = torch.autograd.grad(lookahead / eta, alpha)
                result.lookahead_losses.append(float(_mean(lookahead.detach(), reduce_mean)))
            scale_grad = _mean(scale_grad, reduce_mean)
            if not bool(torch.isfinite(scale_grad).all()):
                result.diverged = True
                break
            scales = optimizer.step(scales, scale_grad.detach(), constraint)
            if progress is not None:
                progress(iteration, result)
    if not result.diverged:
        result.scales = dict(zip(names, scales.tolist()))
    return result


def loss_of_substituted(module: nn.Module, loss_of: LossOf, weights: dict[str, Tensor], batch: Any) -> Tensor:
    """``loss_of(module, batch)`` with the named parameters replaced by ``weights`` (the module is not changed)."""
    return functional_call(_Loss(module, loss_of), {f"module.{n}": w for n, w in weights.items()}, (batch,))


class _Loss(nn.Module):
    """Wraps ``loss_of(module, batch)`` as a forward, so functional_call can substitute the module's parameters."""

    def __init__(self, module: nn.Module, loss_of: LossOf) -> None:
        super().__init__()
        self.module = module
        self.loss_of = loss_of

    def forward(self, batch: Any) -> Tensor:
        return self.loss_of(self.module, batch)


@torch.no_grad()
def apply_scales(module: nn.Module, scales: dict[str, float]) -> None:
    """Multiply each named parameter of ``module`` in place by its scale (identities and optimizers unaffected)."""
    parameters = dict(module.named_parameters())
    for name, scale in scales.items():
        parameters[name].mul_(scale)


def _mean(value: Tensor, reduce_mean: Callable[[Tensor], Tensor] | None) -> Tensor:
    """``value`` averaged over processes; collectives work in place, so they get a copy."""
    return value if reduce_mean is None else reduce_mean(value.detach().clone())
