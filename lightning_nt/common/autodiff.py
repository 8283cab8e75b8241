"""Run a block on kernels that every kind of automatic differentiation can go through.

PyTorch's fused attention kernels (``scaled_dot_product_attention``'s flash / memory-efficient backends, and the
fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval mode) have neither a double
backward on the CPU nor forward-mode derivatives. Capabilities that differentiate twice (Hessian-vector products,
GradInit's constraint branch) or forward (JVPs) run the user's module inside :func:`differentiable_kernels`, which
selects the decomposed "math" kernel: same function, differentiable every way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["differentiable_kernels"]


@contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Attention on its math kernel and without the fused fast path inside the block (both restored after).

    Examples:
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, batch_first=True)
        >>> x = torch.randn(2, 3, 8, requires_grad=True)
        >>> with differentiable_kernels():
        ...     (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        ...     _ = torch.autograd.grad(g.sum(), x)  # double backward through attention
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
