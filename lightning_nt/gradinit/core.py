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
Parameters are never modified during the search: :func:`substituted` puts ``alpha * theta0`` in every place
a parameter is registered (by identity, so shared submodules and tied weights get one scale and get their
``nn.Parameter`` back); :func:`apply_scales` multiplies each tensor in place at the end. A parameter the loss
never uses keeps scale 1.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_nt.common.autodiff import differentiable_kernels
from lightning_nt.common.batches import concatenate_batches
from lightning_nt.common.compiled import uncompiled_name
from lightning_nt.common.state import preserved_modes
from lightning_nt.common.substitution import substituted
from lightning_nt.common.validation import ArgumentError, above, at_least, checked_arguments

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
        lr: learning rate.
        betas: Adam's moment decay rates, each in [0, 1).
        eps: Adam's denominator offset.
        grad_clip: clip of each scalar gradient to ``+-grad_clip`` (0: none).

    Examples:
        >>> adam = ScaleAdam(torch.zeros(2), torch.full((2,), 2.0), torch.tensor([False, True]), lr=0.1)
        >>> adam.step(torch.ones(2), torch.tensor([1.0, 1.0]), constraint=False)
        tensor([0.9000, 1.0000])
    """

    @checked_arguments(lr=above(0), betas=at_least(0), eps=above(0), grad_clip=at_least(0))
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
        if len(betas) != 2 or not all(beta < 1 for beta in betas):
            raise ArgumentError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
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
    """One scale per parameter tensor, by its ``named_parameters`` name (a compiled submodule's without
    ``_orig_mod.``, so a compiled and an uncompiled module give the same names)."""
    lookahead_loss_start: float = math.nan
    """Look-ahead loss ``L(B0 u B2; theta - s)`` on the first half-batches, at the initial weights."""
    lookahead_loss_end: float = math.nan
    """The same look-ahead loss, on the same half-batches, at the rescaled weights (NaN if the search diverged)."""
    lookahead_losses: list[float] = field(default_factory=list)
    """Look-ahead loss ``L(S; theta - s)`` of every objective iteration (each on its own batches)."""
    grad_norms: list[float] = field(default_factory=list)
    """Gradient norm of every iteration."""
    constraint_iterations: int = 0
    unused: list[str] = field(default_factory=list)
    """Parameters the loss never used (their gradient was always absent): they keep scale 1."""
    diverged: bool = False


@contextmanager
def search_mode(module: nn.Module) -> Iterator[None]:
    """Dropout off, BatchNorm on batch statistics without touching its running statistics, math attention.

    Only the BatchNorms in training mode use batch statistics, as the first training steps will: one the module keeps
    in eval mode (a frozen backbone whose ``train()`` leaves it in eval mode) keeps using its running statistics.
    PyTorch's fused scaled-dot-product attention kernels have no double backward on the CPU; the math
    kernel has, so the constraint branch works for attention layers too.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    tracking = [norm.track_running_stats for norm in norms]
    with preserved_modes(module), differentiable_kernels():
        module.eval()
        for norm in norms:
            norm.training, norm.track_running_stats = True, False
        try:
            yield
        finally:
            for norm, track in zip(norms, tracking):
                norm.track_running_stats = track


class _Search:
    """The pieces of one GradInit iteration: the gradient at ``alpha theta0``, its norm, the first step, look-ahead."""

    def __init__(
        self,
        module: nn.Module,
        loss_of: LossOf,
        concatenate: Callable[[Sequence[Any]], Any],
        algorithm: Algorithm,
        eta: float,
        normalize_grad: bool,
        second_order: bool,
        reduce_mean: Callable[[Tensor], Tensor] | None,
    ) -> None:
        self.module, self.loss_of, self.concatenate = module, loss_of, concatenate
        self.algorithm, self.eta, self.normalize_grad, self.second_order = algorithm, eta, normalize_grad, second_order
        self.reduce_mean = reduce_mean
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("GradInit needs parameters that require grad; every parameter of the module is frozen.")
        originals = dict(module.named_parameters())
        self.theta0 = [originals[name].detach().float() for name in self.names]

    def loss(self, weights: Sequence[Tensor], halves: Sequence[Any]) -> Tensor:
        with substituted(self.module, dict(zip(self.names, weights))):
            return self.loss_of(self.module, self.concatenate(list(halves))).float()

    def gradient(self, weights: Sequence[Tensor], halves: Sequence[Any], create_graph: bool) -> list[Tensor | None]:
        """``dL/dtheta`` on the joined ``halves``; ``None`` for a parameter the loss does not use."""
        loss = self.loss(weights, halves)
        if not loss.requires_grad:
            raise ValueError("The loss does not depend on any parameter of the module that requires grad.")
        return list(torch.autograd.grad(loss, weights, create_graph=create_graph, allow_unused=True))

    def norm(self, grads: Sequence[Tensor | None]) -> Tensor:
        """``||g||_1`` (Adam) or ``||g||_2`` (SGD), over the parameters the loss uses."""
        used = [g for g in grads if g is not None]
        if self.algorithm == "adam":
            return torch.stack([g.abs().sum() for g in used]).sum()
        return torch.stack([g.square().sum() for g in used]).sum().sqrt()

    def lookahead(
        self, weights: Sequence[Tensor], grads: Sequence[Tensor | None], norm: Tensor, halves: Sequence[Any]
    ) -> Tensor:
        """``L(halves; theta - s)`` after the simulated first step ``s`` of the optimizer."""
        moved = [w if g is None else w - self._step(g, norm) for w, g in zip(weights, grads)]
        return self.loss(moved, halves)

    def probe(self, scales: Tensor, grad_halves: Sequence[Any], loss_halves: Sequence[Any]) -> float:
        """The look-ahead loss at ``scales`` on fixed half-batches (to compare the start and the end)."""
        weights = [(a * t).requires_grad_(True) for a, t in zip(scales.detach(), self.theta0)]
        grads = self.gradient(weights, grad_halves, create_graph=False)
        with torch.no_grad():
            return float(self.mean(self.lookahead(weights, grads, self.norm(grads), loss_halves)))

    def scale_gradient(
        self, scales: Tensor, batches: Iterator[Any], gamma: float, batch_overlap: bool, result: GradInitResult
    ) -> tuple[Tensor | None, bool, Tensor]:
        """One iteration: the gradient of its objective in the scales, whether the gradient-norm constraint was
        active, and which parameters the loss used. The gradient is ``None`` once the norm or the gradient is not
        finite (the search diverged). Records the iteration's gradient norm and look-ahead loss in ``result``."""
        alpha = scales.clone().requires_grad_(True)
        weights = [a * t for a, t in zip(alpha, self.theta0)]
        half0, half1 = next(batches), next(batches)
        grads = self.gradient(weights, [half0, half1], create_graph=True)
        uses = torch.tensor([g is not None for g in grads], device=scales.device)
        norm = self.norm(grads)
        decided_norm = float(self.mean(norm.detach()))
        result.grad_norms.append(decided_norm)
        if not math.isfinite(decided_norm):
            return None, False, uses
        constraint = decided_norm > gamma
        if constraint:  # above the gradient-norm constraint: lower the norm
            (scale_grad,) = torch.autograd.grad(norm, alpha)
            result.constraint_iterations += 1
        else:  # lower the loss after the simulated first step
            half2 = next(batches)
            first = half0 if batch_overlap else next(batches)
            lookahead = self.lookahead(weights, grads, norm, [first, half2])
            (scale_grad,) = torch.autograd.grad(lookahead / self.eta, alpha)
            result.lookahead_losses.append(float(self.mean(lookahead.detach())))
        scale_grad = self.mean(scale_grad)
        if not bool(torch.isfinite(scale_grad).all()):
            return None, constraint, uses
        return scale_grad.detach(), constraint, uses

    def mean(self, value: Tensor) -> Tensor:
        """``value`` averaged over processes; collectives work in place, so they get a copy."""
        return value if self.reduce_mean is None else self.reduce_mean(value.detach().clone())

    def _step(self, grad: Tensor, norm: Tensor) -> Tensor:
        if self.algorithm == "adam":
            step = self.eta * grad.sign()
        else:
            step = self.eta * grad / norm if self.normalize_grad else self.eta * grad
        return step if self.second_order else step.detach()


SEARCH_RULES = {
    "iterations": at_least(1),
    "lr": above(0),
    "eta": above(0),
    "gamma": above(0),
    "min_scale": above(0),
    "max_scale": above(0),
    "grad_clip": at_least(0),
}
"""The ranges of the search's arguments, shared by :func:`gradinit` and the ``GradInit`` callback."""


@checked_arguments(**SEARCH_RULES)
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

    Runs in :func:`search_mode` (dropout off, BatchNorm in training mode on batch statistics without updating them),
    in fp32.
    The look-ahead loss is also measured on the first half-batches before the search and after it
    (``lookahead_loss_start``/``_end``), whichever branch the iterations took.

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
        max_scale: upper bound for the scales of weights, if any (> ``min_scale``).
        grad_clip: clip of each scalar gradient (0: none).
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
    if max_scale is not None and not max_scale > min_scale:
        raise ArgumentError(f"`max_scale` must be > min_scale={min_scale}, got {max_scale}.")
    search = _Search(
        module, loss_of, concatenate or concatenate_batches, algorithm, eta, normalize_grad, second_order, reduce_mean
    )
    optimizer = _scale_optimizer(search, lr, min_scale, max_scale, grad_clip)
    scales = torch.ones(len(search.names), device=search.theta0[0].device)
    used = torch.zeros(len(search.names), dtype=torch.bool, device=scales.device)
    result = GradInitResult(scales={})
    probe_grad, probe_loss, batches = _probe_halves(batches, batch_overlap)
    with search_mode(module), torch.enable_grad():
        result.lookahead_loss_start = search.probe(scales, probe_grad, probe_loss)
        for iteration in range(iterations):
            scale_grad, constraint, uses = search.scale_gradient(scales, batches, gamma, batch_overlap, result)
            used |= uses
            if scale_grad is None:
                result.diverged = True
                break
            scales = optimizer.step(scales, scale_grad, constraint)
            if progress is not None:
                progress(iteration, result)
        used = search.mean(used.float()) > 0  # used on any process: every process keeps the same scales
        if not result.diverged:
            scales = torch.where(used, scales, torch.ones_like(scales))
            result.lookahead_loss_end = search.probe(scales, probe_grad, probe_loss)
    names = [uncompiled_name(name) for name in search.names]  # a compiled submodule's names without _orig_mod.
    result.unused = [name for name, use in zip(names, used.tolist()) if not use]
    if not result.diverged:
        result.scales = dict(zip(names, scales.tolist()))
    return result


def _probe_halves(batches: Iterator[Any], batch_overlap: bool) -> tuple[list[Any], list[Any], Iterator[Any]]:
    """The fixed half-batches that measure the look-ahead loss before and after the search (gradient halves,
    look-ahead halves), taken from the front of ``batches``, and ``batches`` that still yields them first."""
    probe = [next(batches) for _ in range(3 if batch_overlap else 4)]
    grad_halves, loss_halves = probe[:2], [probe[0], probe[2]] if batch_overlap else probe[2:]
    return grad_halves, loss_halves, itertools.chain(probe, batches)


def _scale_optimizer(
    search: _Search, lr: float, min_scale: float, max_scale: float | None, grad_clip: float
) -> ScaleAdam:
    """The scalar Adam with the official bounds: weights in [min_scale, max_scale], biases >= 0, zero norms frozen."""
    device = search.theta0[0].device
    is_bias = torch.tensor([name.split(".")[-1].startswith("bias") for name in search.names], device=device)
    lower = torch.full(is_bias.shape, float(min_scale), device=device).masked_fill(is_bias, 0.0)
    upper = torch.full(is_bias.shape, math.inf, device=device)
    if max_scale is not None:
        upper = upper.masked_fill(~is_bias, float(max_scale))
    frozen = torch.stack([t.norm() == 0 for t in search.theta0]).to(device)
    return ScaleAdam(lower, upper, frozen, lr=lr, grad_clip=grad_clip)


def loss_of_substituted(module: nn.Module, loss_of: LossOf, weights: Mapping[str, Tensor], batch: Any) -> Tensor:
    """``loss_of(module, batch)`` with the named parameters replaced by ``weights`` (the module is not changed)."""
    with substituted(module, weights):
        return loss_of(module, batch)


@torch.no_grad()
def apply_scales(module: nn.Module, scales: Mapping[str, float]) -> None:
    """Multiply each named parameter of ``module`` in place by its scale (identities and optimizers unaffected).

    Parameters of a submodule compiled with ``torch.compile`` are named with or without its ``_orig_mod.``.
    """
    parameters = {uncompiled_name(name): p for name, p in module.named_parameters(remove_duplicate=False)}
    for name, scale in scales.items():
        parameters[uncompiled_name(name)].mul_(scale)
