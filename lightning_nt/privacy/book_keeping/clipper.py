"""The book-keeping clipper: hooks that record each layer's calls, the backward-time pieces, clip factors, and the
sums of clipped gradients into ``.grad`` (see the package docstring for the method).

The per-layer rules are chosen in ``rules.py``; what one layer's calls left behind is a ``record.Record``.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_nt.common.validation import Rule, above, at_least, checked_arguments
from lightning_nt.privacy.agreement import Refuse, raise_refusal
from lightning_nt.privacy.book_keeping.pieces import ClippedSum, Piece
from lightning_nt.privacy.book_keeping.record import Record, positional_input_refusal, second_backward_refusal
from lightning_nt.privacy.book_keeping.rules import layers_of, pieces_for

__all__ = ["BookKeepingClipper"]


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off, and TF32 off for cuDNN convolutions and CUDA matrix products (global flags, restored after):
    per-example norms and clipped sums in full precision whatever the user's settings, so that no example is
    released above the clip bound by rounding (operands rounded to TF32 released up to 1.00005 C, emulated)."""
    matmul, convolution = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = convolution


def _in_full_precision(method: Any) -> Any:
    """Run a clipper's method under :func:`full_precision` on the device of its first layer."""

    @functools.wraps(method)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        with full_precision(next(self.layers[0].parameters()).device.type if self.layers else "cpu"):
            return method(self, *args, **kwargs)

    return wrapped


class BookKeepingClipper:
    """Per-example clipping and summation of a module's gradients in one backward pass.

    Args:
        module: the network; every trainable parameter must belong to a supported layer (or one with an Opacus
            per-sample rule) and to only one layer. Layers must see the batch in dimension 0.
        max_grad_norm: the clipping bound ``C``.
        loss_reduction: ``"mean"`` if the loss that is back-propagated is the mean over the batch's rows (as a
            ``training_step`` returns), ``"sum"`` if it is their sum.
        group_size: consecutive rows of the batch that form one privacy unit (``K`` augmented views of one
            example: their gradients are averaged before clipping).
        norm_dtype: the least dtype of the norm computations, clip factors and clipped sums (fp32 also when
            training in bf16; a layer with float64 weights computes in float64).
    """

    @checked_arguments(
        max_grad_norm=above(0),
        group_size=at_least(1),
        norm_dtype=Rule(lambda dtype: dtype.is_floating_point, "a floating-point dtype (e.g. torch.float32)"),
    )
    def __init__(
        self,
        module: nn.Module,
        max_grad_norm: float,
        loss_reduction: Literal["mean", "sum"] = "mean",
        group_size: int = 1,
        norm_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.module, self.max_grad_norm = module, max_grad_norm
        self.loss_reduction, self.group_size, self.norm_dtype = loss_reduction, group_size, norm_dtype
        self.layers = layers_of(module)
        self._names = {layer: name for name, layer in module.named_modules()}
        self._trainable = {id(p) for layer in self.layers for p in layer.parameters(recurse=False) if p.requires_grad}
        self._records: dict[nn.Module, Record] = {}
        self._recording = False
        self.refuse: Refuse = raise_refusal  # what a refusal met while recording does (the DP engine may hold it)
        self._handles: list[Any] = []
        self._frozen: list[nn.Parameter] = []
        self._carried: dict[nn.Parameter, Tensor] = {}
        self.last_norms: Tensor | None = None

    def trainable(self, parameter: nn.Parameter | None) -> bool:
        """Whether ``parameter`` was trainable when the clipper was built (its gradient is formed here)."""
        return parameter is not None and id(parameter) in self._trainable

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Run the forward pass and the backward pass inside this block: inputs and output gradients are kept.

        The layers' trainable parameters do not require grad inside the block (restored on exit, also on error),
        so autograd computes no ordinary weight gradient. :meth:`start` and :meth:`stop` do the same in two calls.
        """
        self.start()
        try:
            yield
        finally:
            self.stop()

    def start(self) -> None:
        """Begin recording a forward and backward pass (see :meth:`recording`)."""
        if self._recording:
            return
        self._records = {layer: Record() for layer in self.layers}
        self._frozen = [
            p for layer in self.layers for p in layer.parameters(recurse=False) if self.trainable(p) and p.requires_grad
        ]
        self._handles = [layer.register_forward_hook(self._keep) for layer in self.layers]
        for parameter in self._frozen:
            parameter.requires_grad_(False)
        self._recording = True

    def stop(self) -> None:
        """End recording: hooks removed, the parameters require grad again. Safe to call when not recording."""
        for handle in self._handles:
            handle.remove()
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self._handles, self._frozen, self._recording = [], [], False

    def discard(self) -> None:
        """Forget everything derived from the batch: recorded activations, carried sums, the last norms."""
        self._records = {layer: Record() for layer in self.layers} if self._recording else {}
        self._carried, self.last_norms = {}, None

    def _keep(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        if not inputs or not isinstance(inputs[0], Tensor):
            self.refuse(positional_input_refusal(self._names[layer], type(layer).__name__))
            return None
        record = self._records[layer]
        source = inputs[0]
        record.inputs.append(source.detach())
        record.versions.append(source._version)
        index = len(record.grads)
        record.grads.append(None)
        replaced = None
        if not output.requires_grad:  # nothing upstream requires grad: the graph starts here
            output = output.detach().requires_grad_(True)
            replaced = output.clone()  # a non-leaf, so in-place operations after this layer stay allowed

        def keep_gradient(gradient: Tensor) -> None:
            if index >= len(record.grads) or record.grads[index] is not None:  # formed, or this call's G is in
                self.refuse(second_backward_refusal(self._names[layer], type(layer).__name__))
                return
            record.grads[index] = gradient.detach()
            if record.inputs[0].shape[0] and record.problem(self.group_size) is None:  # else clip_and_sum names it
                self._form(layer, record)

        output.register_hook(keep_gradient)
        return replaced

    def _form(self, layer: nn.Module, record: Record) -> None:
        """The layer's pieces (norms now, what the clipped sum needs kept); its recorded tensors let go."""
        dtype = torch.promote_types(self.norm_dtype, next(layer.parameters()).dtype)  # a float64 model: float64
        inputs = [a.to(dtype) if a.is_floating_point() else a for a in record.inputs]  # embedding indices stay
        grads = [g.to(dtype) for g in record.grads if g is not None]
        record.rows = record.inputs[0].shape[0]
        with full_precision(record.inputs[0].device.type):  # in norm_dtype, whatever the backward's
            record.pieces = pieces_for(layer, inputs, grads, self)
        record.held = [(weakref.ref(tensor), tensor._version) for tensor in (*inputs, *grads)]
        record.inputs, record.grads = [], []

    @_in_full_precision
    def clip_and_sum(self, batch_size: int, carry: bool = False) -> Tensor:
        """Set every trainable parameter's ``.grad`` to the sum over privacy units of their clipped gradients.

        Call after the backward pass of a :meth:`recording` block, with the number of rows the module saw. With
        ``carry=True`` the sums are kept here instead (a physical part of a larger logical batch) and added to the
        ``.grad`` of the next call without ``carry``. A unit whose gradient is not finite contributes zero (its norm
        is returned as NaN/inf; the sensitivity stays ``max_grad_norm``). Returns each unit's gradient norm before
        clipping (in at least ``norm_dtype``). The recorded activations are freed.
        """
        if self._recording:
            raise RuntimeError("Call `clip_and_sum` after the recording has ended.")
        if batch_size % self.group_size:
            raise ValueError(f"A batch of {batch_size} rows is not made of groups of `group_size`={self.group_size}.")
        try:
            pieces = [piece for layer in self.layers for piece in self._pieces(layer, batch_size)]
            if not pieces:
                raise RuntimeError("No recorded forward/backward pass: run both inside `recording()` first.")
            # the pieces hold each unit's gradient of the sum of its rows' terms of the back-propagated loss: a
            # unit's gradient (the mean over its rows of their own losses' gradients) is that times `scale`
            scale = (float(batch_size) if self.loss_reduction == "mean" else 1.0) / self.group_size
            norms = torch.stack([piece.squared_norms for piece in pieces]).sum(0).sqrt() * scale
            finite = torch.isfinite(norms)
            factors = torch.where(finite, (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0), 0.0)
            keep = None if bool(finite.all()) else finite  # masking costs a pass over the data: only when needed
            sums = {
                piece.parameter: piece.clipped_sum((factors * scale).to(piece.squared_norms.dtype), keep)
                for piece in pieces
            }
            self._deliver(sums, carry)
            self.last_norms = norms
            return norms
        finally:
            self._records = {}

    @_in_full_precision
    def squared_norms(self, batch_size: int) -> dict[nn.Parameter, Tensor]:
        """Each unit's squared gradient norm for every parameter of the layers that ran, after the backward pass of a
        :meth:`recording` block (up to the scale of the loss's reduction); the recorded activations are freed."""
        if self._recording:
            raise RuntimeError("Call `squared_norms` after the recording has ended.")
        try:
            return {
                piece.parameter: piece.squared_norms
                for layer in self.layers
                for piece in self._pieces(layer, batch_size)
            }
        finally:
            self._records = {}

    def _deliver(self, sums: dict[nn.Parameter, Tensor], carry: bool) -> None:
        for parameter, total in self._carried.items():
            sums[parameter] = sums[parameter] + total if parameter in sums else total
        if carry:
            self._carried = sums
            return
        self._carried = {}
        for parameter, total in sums.items():
            parameter.grad = total.to(parameter.dtype)

    def _pieces(self, layer: nn.Module, batch_size: int) -> list[Piece]:
        record = self._records.get(layer)
        if record is None or (record.pieces is None and not record.inputs):  # the layer did not run
            return []
        problem = record.problem(self.group_size, batch_size, self._name(layer))
        if problem is not None:
            raise RuntimeError(problem)
        if record.pieces is None:
            self._form(layer, record)
        return record.pieces or []

    def _name(self, layer: nn.Module) -> str:
        return self._names.get(layer, type(layer).__name__)

    def units(self, tensor: Tensor) -> Tensor:
        """``[N, T, ...] -> [N / K, K * T, ...]``: the K rows of one privacy unit become more positions."""
        if self.group_size == 1:
            return tensor
        rows, positions = tensor.shape[0], tensor.shape[1]
        return tensor.reshape(rows // self.group_size, self.group_size * positions, *tensor.shape[2:])

    def unit_sum(self, per_row: Tensor) -> Tensor:
        """``[N, ...] -> [N / K, ...]``: the sum over each unit's rows."""
        if self.group_size == 1:
            return per_row
        return per_row.reshape(per_row.shape[0] // self.group_size, self.group_size, *per_row.shape[1:]).sum(1)

    def per_rows(self, clipped_sum: ClippedSum) -> ClippedSum:
        """A clipped sum over rows (each row weighted and kept as its unit) as one over units."""
        if self.group_size == 1:
            return clipped_sum
        k = self.group_size
        return lambda weights, keep: clipped_sum(
            weights.repeat_interleave(k), None if keep is None else keep.repeat_interleave(k)
        )
