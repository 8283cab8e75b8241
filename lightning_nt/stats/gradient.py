"""Per-example losses of any module and their directional derivatives, without per-example gradients.

The gradient test needs ``f_i = <grad l_i(theta), v>`` for every example ``i`` of a batch, where ``v`` is a
mean gradient. Materialising per-example gradients costs ``B x |theta|`` memory; forward-mode
differentiation gives all ``f_i`` at once: they are the tangent of the vector of per-example losses
``theta -> (l_1(theta), ..., l_B(theta))`` along ``v``, one batched JVP (``torch.func.jvp`` over
``substituted`` parameters), at about the cost of one forward pass.

Per-example losses come from a ``loss_fn(module, batch)`` that returns a ``[B]`` vector, or, for one that
returns a scalar mean (or for the module's own ``training_step``), from that scalar on one-example batches
vectorised with ``torch.func.vmap``. Inside ``vmap`` torchmetrics objects are silenced (their in-place state
updates can't be batched) and logging is muted; metric states are restored afterwards in any case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.func import jvp
from torchmetrics import Metric

from lightning_nt.common.autodiff import differentiable_kernels, vmap_or_loop
from lightning_nt.common.batches import batch_size, tensors_of
from lightning_nt.common.substitution import substituted

__all__ = ["PerExampleLoss", "directional_derivatives", "double_backward_jvp", "per_example_losses"]

PerExampleLoss = Callable[[nn.Module, Any], Tensor]
"""``loss(module, batch) -> Tensor[B]``: the loss of every example of ``batch`` under ``module``."""


def per_example_losses(scalar_loss: Callable[[Any], Tensor], batch: Any, quiet: nn.Module | None = None) -> Tensor:
    """``[scalar_loss(example) for example in batch]``, as one vectorised call (``torch.func.vmap``).

    Each example is passed as a batch of one, with the structure of ``batch`` (tuples, dicts, dataclasses).
    The torchmetrics objects inside ``quiet`` do nothing during the call.

    Examples:
        >>> inputs = torch.tensor([[1.0], [2.0], [3.0]])
        >>> per_example_losses(lambda b: (b[0] ** 2).mean(), (inputs, torch.arange(3)))
        tensor([1., 4., 9.])
    """
    leaves = tensors_of(batch)
    in_dims = tuple(0 if leaf.ndim > 0 else None for leaf in leaves)

    def one(*examples: Tensor) -> Tensor:
        rows = iter(example.unsqueeze(0) if dim == 0 else example for example, dim in zip(examples, in_dims))
        return scalar_loss(apply_to_collection(batch, Tensor, lambda _: next(rows)))

    with _silenced_metrics(quiet):
        return vmap_or_loop(one, in_dims)(*leaves)


def directional_derivatives(
    module: nn.Module,
    loss: PerExampleLoss,
    batch: Any,
    parameters: Sequence[tuple[str, Tensor]],
    direction: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """``(losses, f)``: every example's loss and ``f_i = <grad_theta l_i, direction>``, by one forward-mode JVP.

    ``parameters`` are ``(name, tensor)`` pairs of ``module.named_parameters()`` (the ones differentiated);
    ``direction`` holds one tensor of the same shape per parameter.

    Examples:
        >>> net = nn.Linear(3, 1, bias=False)
        >>> inputs = torch.randn(5, 3)
        >>> loss = lambda module, batch: module(batch).squeeze(1)  # l_i = <w, x_i>: its gradient is x_i
        >>> _, f = directional_derivatives(net, loss, inputs, list(net.named_parameters()), [torch.ones(1, 3)])
        >>> torch.allclose(f, inputs.sum(1))
        True
    """
    names = [name for name, _ in parameters]
    primals = tuple(tensor.detach() for _, tensor in parameters)
    tangents = tuple(tensor.detach().to(primal.dtype) for tensor, primal in zip(direction, primals))

    def losses(*values: Tensor) -> Tensor:
        with substituted(module, dict(zip(names, values))):
            return _checked_losses(loss(module, batch), batch)

    with differentiable_kernels():
        try:
            return jvp(losses, primals, tangents)
        except NotImplementedError:  # an operation without forward-mode AD: two reverse passes instead
            return double_backward_jvp(losses, primals, tangents)


def double_backward_jvp(
    function: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """``(function(*primals), J @ tangents)`` by two reverse passes, for operations that lack forward-mode AD.

    ``J^T u`` is linear in a dummy cotangent ``u``; differentiating ``<J^T u, tangents>`` with respect to ``u``
    gives ``J tangents``.

    Examples:
        >>> weights = torch.tensor([1.0, 2.0])
        >>> double_backward_jvp(lambda w: torch.stack([w[0] * w[1], w[1] ** 2]), (weights,), (torch.ones(2),))
        (tensor([2., 4.]), tensor([3., 4.]))
    """
    inputs = tuple(primal.detach().requires_grad_() for primal in primals)
    values = function(*inputs)
    dummy = torch.zeros_like(values, requires_grad=True)
    pullback = torch.autograd.grad(values, inputs, dummy, create_graph=True, allow_unused=True)
    used = [(vector, tangent) for vector, tangent in zip(pullback, tangents) if vector is not None]
    (derivatives,) = torch.autograd.grad([v for v, _ in used], dummy, [t for _, t in used])
    return values.detach(), derivatives


def _checked_losses(values: Tensor, batch: Any) -> Tensor:
    if values.shape != (batch_size(batch),):
        raise ValueError(
            f"The per-example loss has shape {tuple(values.shape)}; one value per example "
            f"({batch_size(batch)}) is needed."
        )
    return values


@contextmanager
def _silenced_metrics(module: nn.Module | None) -> Iterator[None]:
    """Make every torchmetrics ``Metric`` inside ``module`` a no-op for the block (their states are untouched)."""
    metrics = [m for m in module.modules() if isinstance(m, Metric)] if module is not None else []
    saved = [(metric, {name: metric.__dict__.get(name) for name in ("forward", "update")}) for metric in metrics]
    for metric in metrics:
        metric.forward = _silent  # type: ignore[method-assign]
        metric.update = _silent  # type: ignore[method-assign]
    try:
        yield
    finally:
        for metric, attributes in saved:
            for name, value in attributes.items():
                if value is None:
                    delattr(metric, name)
                else:
                    setattr(metric, name, value)


def _silent(*args: Any, **kwargs: Any) -> Tensor:
    return torch.zeros(())
