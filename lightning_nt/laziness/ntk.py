"""The empirical neural tangent kernel, its closed form for a wide two-layer ReLU net, and kernel-target alignment.

``empirical_ntk`` is the trace-over-outputs kernel ``K_ij = sum_c <df_c(x_i)/dtheta, df_c(x_j)/dtheta>`` over the
trainable parameters. Per-example Jacobians come from ``torch.func.jacrev`` vmapped over the examples (one reverse
pass per output, cheap when the outputs are few against the parameters, as in classification), or from
``torch.func.jacfwd`` (one forward-mode pass per parameter) when the parameters are fewer than the outputs (of a
chunk of outputs), ``chunk_size`` examples at a time. The Jacobians of all ``m`` examples are held together:
``4 m C P`` bytes for ``C`` outputs and ``P`` parameters (fp32), plus the ``m x m`` kernel; ``output_chunk_size``
sums the kernel over chunks of the outputs (exact) to hold fewer, and :func:`jacobian_bytes` says how many before
measuring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.func import jacfwd, jacrev

from lightning_nt.common.autodiff import vmap_or_loop, without_backward_hooks
from lightning_nt.common.batches import batch_size, select_examples, tensors_of
from lightning_nt.common.errors import explained_errors
from lightning_nt.common.substitution import substituted
from lightning_nt.common.validation import at_least, checked_arguments

__all__ = [
    "ForwardFn",
    "TwoLayerReLU",
    "empirical_ntk",
    "jacobian_bytes",
    "kernel_alignment",
    "two_layer_relu_ntk",
    "zero_centred_kernels",
]

ForwardFn = Callable[[nn.Module, Any], Tensor]
"""``forward_fn(module, batch) -> outputs [B, ...]``: the network's outputs on a batch (default ``module(batch)``)."""


def _call(module: nn.Module, batch: Any) -> Tensor:
    return module(batch)


@checked_arguments(chunk_size=at_least(1), output_chunk_size=at_least(1))
def empirical_ntk(
    module: nn.Module,
    inputs: Any,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    hold_jacobians: bool = True,
    output_chunk_size: int | None = None,
) -> Tensor:
    """The empirical NTK ``K[i, j] = sum_c <df_c(x_i)/dtheta, df_c(x_j)/dtheta>`` of ``module`` on ``inputs``.

    ``inputs`` is a tensor or any batch structure (tuple, dict, dataclass) whose tensors have the examples along
    dimension 0; ``forward_fn(module, batch)`` maps it to outputs ``[m, ...]`` (flattened per example to ``C``
    outputs). The derivative is over the parameters with ``requires_grad``; the module's backward hooks are not run
    (:func:`~lightning_nt.common.autodiff.without_backward_hooks`). Each example's output must depend on
    that example only: call it with the module in eval mode when it has BatchNorm or dropout. The kernel is fp32
    (fp64 if the parameters are), on the parameters' device.

    Args:
        module: the network.
        inputs: the ``m`` examples.
        forward_fn: ``forward_fn(module, batch) -> outputs``; default ``module(batch)``.
        chunk_size: examples per vmapped Jacobian (``None``: all at once).
        hold_jacobians: keep the Jacobians of all ``m`` examples (``4 m C P`` bytes in fp32) and form the kernel in
            one product; ``False`` keeps two chunks' at a time (``8 chunk_size C P`` bytes) and recomputes each
            chunk's Jacobian for every block of the kernel, ``(k + 1) / 2`` times the work for ``k`` chunks.
        output_chunk_size: outputs per Jacobian (``None``: all ``C``): the kernel is summed over chunks of the
            outputs, ``K = sum_chunks J_chunk J_chunk^T`` (exact: the trace over outputs is a sum), so the Jacobians
            held scale with ``output_chunk_size`` instead of ``C``, for one more forward pass per chunk. For networks
            with many outputs (an autoencoder's, a language model's).

    Examples:
        >>> net = nn.Linear(3, 1)  # f(x) = w.x + b, so K = X X^T + 1
        >>> x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
        >>> empirical_ntk(net, x)
        tensor([[2., 2.],
                [2., 6.]])
    """
    forward = forward_fn or _call
    params = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("The module has no parameter with requires_grad=True, so its tangent kernel is empty.")
    count = batch_size(inputs)
    size = chunk_size or count
    tensors = tensors_of(inputs)
    in_dims = tuple(0 if tensor.ndim > 0 else None for tensor in tensors)

    def single(weights: dict[str, Tensor], *example: Tensor) -> Tensor:
        rows = iter([tensor.unsqueeze(0) if dim == 0 else tensor for tensor, dim in zip(example, in_dims)])
        batch = apply_to_collection(inputs, Tensor, lambda _: next(rows))
        with substituted(module, weights):
            return _outputs_tensor(forward(module, batch), module).reshape(-1)

    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params.values()) else torch.float32

    def jacobians(outputs: slice, forward_mode: bool) -> Callable[[int], Tensor]:
        """``jacobian(start)``: ``[b, C' * P]`` for the ``outputs`` of the examples from ``start`` (the trace over
        outputs is a sum over this axis too)."""
        transform = jacfwd if forward_mode else jacrev
        per_example = vmap_or_loop(
            transform(lambda weights, *example: single(weights, *example)[outputs]), (None, *in_dims)
        )

        def jacobian(start: int) -> Tensor:
            chunk = [tensor[start : start + size] if tensor.ndim > 0 else tensor for tensor in tensors]
            rows = per_example(params, *chunk)
            return torch.cat([j.reshape(j.shape[0], j.shape[1], -1).to(dtype) for j in rows.values()], dim=2).flatten(1)

        return jacobian

    total, parameters = outputs_per_example(module, inputs, forward), sum(p.numel() for p in params.values())
    step = output_chunk_size or max(total, 1)
    parts = [slice(first, first + step) for first in range(0, max(total, 1), step)]

    def output_chunk_kernel(part: slice) -> Tensor:
        """One output chunk's kernel: by forward mode (one pass per parameter) when the parameters are fewer than
        the outputs, falling back to reverse mode where an operation has no forward-mode rule (an RNN, a custom
        autograd.Function), else by reverse mode."""
        starts = range(0, count, size)
        if parameters < min(step, total):
            try:
                return _kernel(jacobians(part, True), starts, count, size, hold_jacobians)
            except (NotImplementedError, RuntimeError) as error:
                warnings.warn(
                    f"empirical_ntk: forward mode failed ({type(error).__name__}: {str(error)[:200]}); the "
                    "Jacobians come from reverse mode instead (as many passes as outputs).",
                    stacklevel=3,
                )
        return _kernel(jacobians(part, False), starts, count, size, hold_jacobians)

    with _explained_transform_failures(), without_backward_hooks(module):
        blocks = (output_chunk_kernel(part) for part in parts)
        kernel = next(blocks)
        for block in blocks:  # K = sum over output chunks of J_chunk J_chunk^T
            kernel += block
    return kernel


@torch.no_grad()
def outputs_per_example(module: nn.Module, inputs: Any, forward: ForwardFn) -> int:
    """``C``: the number of outputs of one example, from a forward pass on the first."""
    return _outputs_tensor(forward(module, select_examples(inputs, slice(0, 1))), module).numel()


@torch.no_grad()
def jacobian_bytes(
    module: nn.Module,
    inputs: Any,
    forward_fn: ForwardFn | None = None,
    chunk_size: int | None = None,
    hold_jacobians: bool = True,
    output_chunk_size: int | None = None,
) -> int:
    """The bytes of Jacobians one :func:`empirical_ntk` call with these arguments holds: ``m C P e`` with
    ``hold_jacobians`` (all ``m`` examples'), else ``2 chunk_size C P e`` (two chunks'), for ``C`` outputs per
    example (from one forward pass on the first example; at most ``output_chunk_size``), ``P`` trainable
    parameters and ``e`` bytes per element (4, or 8 when a parameter is fp64). What to compare with the memory at
    hand before measuring a kernel; the kernel itself (``m^2 e``) and the autograd work space of one chunk come on
    top.

    Examples:
        >>> jacobian_bytes(nn.Linear(3, 2), torch.zeros(10, 3))  # 10 examples x 2 outputs x 8 parameters x 4 bytes
        640
        >>> jacobian_bytes(nn.Linear(3, 2), torch.zeros(10, 3), chunk_size=2, hold_jacobians=False)
        256
        >>> jacobian_bytes(nn.Linear(3, 2), torch.zeros(10, 3), output_chunk_size=1)
        320
    """
    params = [p for p in module.parameters() if p.requires_grad]
    count = batch_size(inputs)
    outputs = min(outputs_per_example(module, inputs, forward_fn or _call), output_chunk_size or math.inf)
    element = 8 if any(p.dtype == torch.float64 for p in params) else 4
    held = count if hold_jacobians else 2 * min(chunk_size or count, count)
    return int(held * outputs * sum(p.numel() for p in params) * element)


def _kernel(jacobian: Callable[[int], Tensor], starts: range, count: int, size: int, hold_jacobians: bool) -> Tensor:
    """``J J^T`` from the chunks' Jacobians ``jacobian(start)``: all held at once, or two chunks at a time."""
    if hold_jacobians:  # filled chunk by chunk: a concatenation would hold every chunk twice at its peak
        flat: Tensor | None = None
        for start in starts:
            rows = jacobian(start)
            if flat is None:
                flat = rows.new_empty(count, rows.shape[1])
            flat[start : start + len(rows)] = rows
            del rows
        assert flat is not None
        return flat @ flat.T
    kernel: Tensor | None = None
    for index, first in enumerate(starts):
        rows = jacobian(first)
        if kernel is None:
            kernel = rows.new_empty(count, count)
        for second in starts[index:]:
            block = rows @ (rows if second == first else jacobian(second)).T
            kernel[first : first + size, second : second + size] = block
            kernel[second : second + size, first : first + size] = block.T
    assert kernel is not None
    return kernel


def _explained_transform_failures() -> AbstractContextManager[None]:
    """torch.func's refusals of activation checkpointing (either kind), turned into the reason and the fix."""
    return explained_errors(
        lambda text: "saved tensor hooks" in text or "setup_context" in text,
        lambda error: (
            f"The tangent kernel's per-example Jacobians come from torch.func, which can't go through activation "
            f"checkpointing (torch.utils.checkpoint) or an autograd.Function without setup_context ({error}). "
            "Turn checkpointing off while the kernel is measured: pass `forward_fn(module, batch)` that runs the "
            "layers without it."
        ),
    )


def _outputs_tensor(outputs: Any, module: nn.Module) -> Tensor:
    """The outputs ``forward_fn`` returned, refused (naming the fix) unless they are one tensor."""
    if not isinstance(outputs, Tensor):
        raise TypeError(
            f"The tangent kernel needs the network's outputs as one tensor [B, ...], but the forward pass of "
            f"{type(module).__name__} returned a {type(outputs).__name__}. Pass `forward_fn(module, batch)` "
            "returning that tensor, e.g. `lambda module, batch: module(**batch).logits` or "
            "`lambda module, batch: module(batch[0])[0]`."
        )
    return outputs


def kernel_alignment(kernel: Tensor, targets: Tensor, num_classes: int | None = None) -> float:
    """Centred kernel-target alignment (Cortes, Mohri & Rostamizadeh 2012) of ``kernel`` with the targets.

    ``A = <K_c, L_c>_F / (||K_c||_F ||L_c||_F)`` with ``L = Y Y^T``, ``Y`` the one-hot labels (integer ``targets``)
    or the target rows themselves (float ``targets [m, C]``), and ``M_c = H M H``, ``H = I - 11^T/m``.
    In [-1, 1]; 1 when the kernel is the target kernel up to scale. NaN when either centred kernel is zero.

    Examples:
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> onehot = torch.nn.functional.one_hot(labels).double()
        >>> kernel_alignment(5 * onehot @ onehot.T + 2, labels)
        1.0
    """
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"`kernel` must be a square [m, m] matrix, got shape {tuple(kernel.shape)}.")
    if targets.shape[0] != kernel.shape[0]:
        raise ValueError(f"`targets` has {targets.shape[0]} rows for a kernel over {kernel.shape[0]} examples.")
    centered_k, centered_l = _centered_kernels(kernel, targets, num_classes)
    denominator = float(centered_k.norm() * centered_l.norm())
    return float((centered_k * centered_l).sum()) / denominator if denominator > 0 else math.nan


def zero_centred_kernels(kernel: Tensor, targets: Tensor, num_classes: int | None = None) -> list[str]:
    """Which of the two centred kernels of :func:`kernel_alignment` is zero (``"label kernel"``, ``"NTK"``), making
    the alignment undefined: the labels of one class only, or every example with the same output gradients.

    Examples:
        >>> zero_centred_kernels(torch.eye(3), torch.tensor([1, 1, 1]))
        ['label kernel']
    """
    centered_k, centered_l = _centered_kernels(kernel, targets, num_classes)
    return [name for name, matrix in (("label kernel", centered_l), ("NTK", centered_k)) if float(matrix.norm()) == 0]


def _centered_kernels(kernel: Tensor, targets: Tensor, num_classes: int | None) -> tuple[Tensor, Tensor]:
    """``H K H`` and ``H Y Y^T H`` in fp64: the centred NTK and the centred target kernel."""
    kernel = kernel.double()
    if targets.is_floating_point():
        rows = targets.reshape(targets.shape[0], -1).to(kernel)
    else:
        rows = nn.functional.one_hot(targets.long(), num_classes or -1).to(kernel)
    return _centered(kernel), _centered(rows @ rows.T)


def _centered(matrix: Tensor) -> Tensor:
    return matrix - matrix.mean(0, keepdim=True) - matrix.mean(1, keepdim=True) + matrix.mean()


class TwoLayerReLU(nn.Module):
    """``f(x) = W2 relu(W1 x / sqrt(d)) / sqrt(n)``, weights ``N(0, 1)``: a two-layer ReLU net, NTK parameterisation.

    ``d`` inputs, ``n`` hidden units (``width``), ``outputs`` outputs, no biases. As ``n`` grows its empirical NTK
    tends to ``outputs * two_layer_relu_ntk(x, y)`` (the trace over independent output units).

    Examples:
        >>> TwoLayerReLU(4, width=16, outputs=3)(torch.randn(2, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, inputs: int, width: int, outputs: int = 1, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.hidden = nn.Parameter(torch.randn(width, inputs, generator=generator))
        self.readout = nn.Parameter(torch.randn(outputs, width, generator=generator))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.relu(x @ self.hidden.T / math.sqrt(self.hidden.shape[1]))
        return hidden @ self.readout.T / math.sqrt(self.hidden.shape[0])


def two_layer_relu_ntk(x: Tensor, y: Tensor) -> Tensor:
    """The infinite-width NTK of :class:`TwoLayerReLU` (one output), in closed form (arc-cosine kernels).

    For ``f(x) = (1/sqrt(n)) sum_k a_k relu(w_k . x / sqrt(d))`` with ``a_k ~ N(0, 1)``, ``w_k ~ N(0, I_d)``:

    ``Theta(x, y) = (1/d) [ |x||y| (sin t + (pi - t) cos t) / (2 pi) + (x . y) (pi - t) / (2 pi) ]``,

    with ``t`` the angle between ``x`` and ``y``. The first term is the gradient in the read-out weights
    (``E relu(u) relu(v)``, Cho & Saul's degree-1 arc-cosine kernel), the second that in the hidden weights
    (``E 1[u > 0] 1[v > 0] x . y / d``, the degree-0 kernel); Jacot et al. (2018). Returns ``[len(x), len(y)]``.

    Examples:
        >>> x = torch.tensor([[1.0, 0.0]])
        >>> two_layer_relu_ntk(x, x).item()  # t = 0: (1/2)(pi/(2 pi) + pi/(2 pi))
        0.5
    """
    x, y = x.double(), y.double()
    norms = x.norm(dim=1, keepdim=True) * y.norm(dim=1)
    dots = x @ y.T
    angle = torch.arccos((dots / norms.clamp_min(1e-300)).clamp(-1.0, 1.0))
    arc1 = norms * (torch.sin(angle) + (math.pi - angle) * torch.cos(angle)) / (2 * math.pi)
    arc0 = dots * (math.pi - angle) / (2 * math.pi)
    return (arc1 + arc0) / x.shape[1]
