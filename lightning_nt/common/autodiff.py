"""Run a block on kernels that every kind of automatic differentiation can go through.

PyTorch's fused attention kernels (``scaled_dot_product_attention``'s flash / memory-efficient backends, and the
fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode) have neither a double
backward on the CPU nor forward-mode derivatives. Capabilities that differentiate twice (Hessian-vector products,
GradInit's constraint branch) or forward (JVPs) run the user's module inside :func:`differentiable_kernels`, which
selects the decomposed "math" kernel: same function, differentiable every way. Code compiled with
``torch.compile`` has no double backward either (AOTAutograd's compiled backward): it runs eagerly in the block
(:func:`~lightning_nt.common.compiled.eager_execution`). An operation that has no second
derivative at all (``nn.EmbeddingBag``'s backward) is named in the error, with the layer that replaces it.
``F.hardsigmoid`` (MobileNetV3's squeeze-and-excitation gate, ``nn.Hardsigmoid``) has a first derivative but no
second one in PyTorch: inside the block it is computed as ``relu6(x + 3) / 6``, the same values (bit for bit), whose
second derivative exists (zero almost everywhere, as for every piecewise-linear function).
``torch.func`` transforms can't pass a module's full backward hooks (a user's gradient monitor, Opacus's
per-sample hooks): :func:`without_backward_hooks` sets them aside while a capability measures the function.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from lightning_nt.common.compiled import eager_execution

__all__ = ["differentiable_kernels", "vmap_or_loop", "without_backward_hooks"]


@contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Attention on its math kernel and without the fused fast path, compiled code run eagerly, ``F.hardsigmoid``
    as ``relu6(x + 3) / 6``, inside the block (all restored after).

    Examples:
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
        >>> x = torch.randn(2, 3, 8, requires_grad=True)
        >>> with differentiable_kernels():
        ...     (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        ...     _ = torch.autograd.grad(g.sum(), x)  # double backward through attention
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    hardsigmoid, F.hardsigmoid = F.hardsigmoid, _hardsigmoid
    try:
        with sdpa_kernel(SDPBackend.MATH), eager_execution():
            yield
    except (NotImplementedError, RuntimeError) as error:
        if not re.search(r"derivative for .* is not implemented", str(error)):
            raise
        raise NotImplementedError(
            "This measurement differentiates the model twice (a Hessian-vector product or a forward-mode "
            f"derivative), and PyTorch has no such derivative for one of its operations ({error}). nn.EmbeddingBag "
            "is such a layer: nn.Embedding followed by .sum(1) or .mean(1) computes the same and can be "
            "differentiated twice."
        ) from error
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        F.hardsigmoid = hardsigmoid


def _hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.hardsigmoid`` written with ``relu6``, which PyTorch differentiates twice (``hardsigmoid_backward`` has no
    derivative); the same values and first derivative (zero outside ``(-3, 3)``)."""
    result = F.relu6(input + 3.0) / 6.0
    return input.copy_(result) if inplace else result


@contextmanager
def without_backward_hooks(module: nn.Module) -> Iterator[None]:
    """The backward hooks of ``module`` and its submodules set aside inside the block (the same hooks, and their
    handles, are back after it).

    A full backward hook wraps the module's outputs in an autograd Function that ``torch.func`` transforms
    (``jacrev``, ``vmap``, ``jvp``) refuse. Such hooks observe or rewrite the gradients of training; a measurement
    of the function itself (its Jacobian, its tangent kernel) does not run them.

    Examples:
        >>> layer = nn.Linear(2, 1)
        >>> handle = layer.register_full_backward_hook(lambda module, grad_input, grad_output: None)
        >>> with without_backward_hooks(layer):
        ...     torch.func.jacrev(layer)(torch.ones(2)).shape
        torch.Size([1, 2])
        >>> len(layer._backward_hooks)
        1
    """
    hooked = [m for m in module.modules() if m._backward_hooks or m._backward_pre_hooks]
    saved = [(m._backward_hooks, m._backward_pre_hooks) for m in hooked]
    try:
        for m in hooked:
            m._backward_hooks, m._backward_pre_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for m, (hooks, pre_hooks) in zip(hooked, saved):
            m._backward_hooks, m._backward_pre_hooks = hooks, pre_hooks


def vmap_or_loop(function: Callable[..., Any], in_dims: tuple[int | None, ...]) -> Callable[..., Any]:
    """``torch.func.vmap(function, in_dims)``, falling back to a loop over the examples where vmap can't batch.

    Some operations have no batching rule (``nn.LSTM`` / ``nn.GRU``'s fused kernels): the fallback calls
    ``function`` on each example (dimension ``in_dims[k]`` selected away, as vmap does) and stacks the outputs,
    which may be tensors or containers of them. A genuine error in ``function`` is raised again by the loop.

    Examples:
        >>> square_sum = vmap_or_loop(lambda x: (x**2).sum(), in_dims=(0,))
        >>> square_sum(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([ 5., 25.])
    """
    batched = vmap(function, in_dims=in_dims)

    def call(*args: Any) -> Any:
        try:
            return batched(*args)
        except RuntimeError:
            size = next(arg.shape[dim] for arg, dim in zip(args, in_dims) if dim is not None)
            outputs = [
                function(*(arg.select(dim, i) if dim is not None else arg for arg, dim in zip(args, in_dims)))
                for i in range(size)
            ]
            return pytree.tree_map(lambda *values: torch.stack(values), *outputs)

    return call
