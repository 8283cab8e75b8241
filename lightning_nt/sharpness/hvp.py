"""Hessian-vector products of a mean loss over chunks of data, by double backward in fp32.

The loss is the size-weighted mean over chunks (``share`` = chunk size / total), so chunking changes
memory, not the operator. With a single chunk the gradient graph is built once and reused by every
product of a measurement (one extra backward per product instead of a forward and two backwards).
Under data parallelism a ``reduce_sum`` callable makes every product the mean over all processes'
data: all processes then hold the same vectors and the solver runs identically everywhere. Code compiled with
``torch.compile`` in the loss runs eagerly (its compiled backward has no double backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from lightning_nt.common.compiled import eager_execution
from lightning_nt.common.validation import ArgumentError, between, checked_arguments, non_empty

__all__ = ["HessianOperator", "flatten", "unflatten"]

LossChunks = Callable[[], Iterable[tuple[Tensor, float]]]
"""Returns an iterable of ``(chunk mean loss, share)``; each loss must be differentiable w.r.t. the parameters."""


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    return [chunk.view_as(t) for chunk, t in zip(vector.split([t.numel() for t in like]), like)]


class HessianOperator:
    """``v -> H v`` for the Hessian of ``sum(share * loss)`` w.r.t. ``params``, as flat fp32 vectors.

    Args:
        params: the parameters (leaf tensors with ``requires_grad``) the Hessian is taken over.
        loss_chunks: called once per product (or once in all with ``reuse_graph``), yields ``(loss, share)``.
        reuse_graph: keep the gradient graphs between products (memory: one double-backward graph per chunk).
        reduce_sum: sums a tensor over processes (data parallelism); ``None`` on one process.
        weight: this process's share of the total data when ``reduce_sum`` is given.

    Examples:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> H = HessianOperator([w], lambda: [((w**3).sum(), 1.0)])
        >>> H.matvec(torch.tensor([1.0, 0.0]))
        tensor([6., 0.])
    """

    @checked_arguments(params=non_empty(), weight=between(0, 1, low_open=True))
    def __init__(
        self,
        params: Sequence[Tensor],
        loss_chunks: LossChunks,
        reuse_graph: bool = True,
        reduce_sum: Callable[[Tensor], Tensor] | None = None,
        weight: float = 1.0,
    ) -> None:
        frozen = [index for index, p in enumerate(params) if not p.requires_grad]
        if frozen:
            raise ArgumentError(
                f"`params` must all require grad (the Hessian is taken over them), but those at {frozen} do not; "
                "leave frozen parameters out."
            )
        self.params = list(params)
        self.loss_chunks = loss_chunks
        self.reuse_graph = reuse_graph
        self.reduce_sum = reduce_sum
        self.weight = weight
        self.num_matvecs = 0
        self._graphs: list[tuple[list[Tensor], float]] | None = None
        self.numel = sum(p.numel() for p in self.params)
        self.dtype = torch.promote_types(self.params[0].dtype, torch.float32)
        """Dtype of the flat vectors: fp32, or fp64 for a double-precision module."""

    @torch.no_grad()
    @eager_execution()
    def loss(self) -> float:
        """The loss itself (reduced over processes), without building graphs."""
        total = torch.zeros((), device=self.params[0].device, dtype=self.dtype)
        for loss, share in self.loss_chunks():
            total += share * loss.detach()
        return float(self._reduce(total))

    @eager_execution()
    def gradient(self) -> Tensor:
        """The flat gradient of the loss (reduced over processes)."""
        total = torch.zeros(self.numel, device=self.params[0].device, dtype=self.dtype)
        for grads, share in self._gradient_graphs():
            total += share * flatten([g.detach() for g in grads])
        return self._reduce(total)

    @eager_execution()  # torch.compile'd code has no double backward: the loss chunks run its eager code
    def matvec(self, vector: Tensor) -> Tensor:
        self.num_matvecs += 1
        pieces = [piece.to(p.dtype) for piece, p in zip(unflatten(vector, self.params), self.params)]
        total = torch.zeros(self.numel, device=self.params[0].device, dtype=self.dtype)
        for grads, share in self._gradient_graphs():
            pairs = [(g, piece) for g, piece in zip(grads, pieces) if g.requires_grad]
            if not pairs:  # the loss is at most linear in the parameters
                continue
            products = torch.autograd.grad(
                [g for g, _ in pairs],
                self.params,
                grad_outputs=[piece for _, piece in pairs],
                retain_graph=self.reuse_graph,
                allow_unused=True,
                materialize_grads=True,
            )
            total += share * flatten(products)
        return self._reduce(total)

    def release(self) -> None:
        """Free the kept gradient graphs."""
        self._graphs = None

    def _gradient_graphs(self) -> Iterable[tuple[list[Tensor], float]]:
        if self._graphs is not None:
            return self._graphs
        graphs = (
            (list(torch.autograd.grad(loss, self.params, create_graph=True, materialize_grads=True)), share)
            for loss, share in self.loss_chunks()
        )
        if self.reuse_graph:
            self._graphs = list(graphs)
            return self._graphs
        return graphs

    def _reduce(self, vector: Tensor) -> Tensor:
        if self.reduce_sum is None:
            return vector
        return self.reduce_sum(vector * self.weight)
