"""Single-backward DP-SGD clipping ("book-keeping", Bu, Wang, Zha & Karypis, ICML 2023).

Opacus's hooks materialise every example's gradient (``B x P`` floats), then take norms, clip and sum. Here
one ordinary backward pass is enough, and a per-example gradient is kept only where it is small:

1. During the forward pass each supported layer keeps its input ``A``; a tensor hook receives the gradient ``G``
   of the loss with respect to its output. The layer's parameters do not require grad while this runs, so
   autograd never computes their ordinary weight gradients (only the input gradients the chain needs).
2. As soon as a layer's ``G`` is in (still inside the backward pass), each example's squared gradient norm for
   that layer comes either from the *ghost* Gram identity ``||sum_t g_t a_tᵀ||² = sum_{t,s} (a_t·a_s)(g_t·g_s)``
   over the layer's positions ``t`` (cost ``T²(d+p)``) or from instantiating the example's ``p x d`` gradient
   (cost ``T d p``), whichever is cheaper for that layer ("mixed ghost norm"); a convolution's per-example kernels
   come from one weight-gradient call with the examples as groups on a CPU, from an im2col view and one batched
   product elsewhere. Then ``A`` and ``G`` are let go, unless the clipped sum needs them: activations are freed as
   the backward pass proceeds. The norms of all layers add up to the example's full gradient norm.
3. Clip factors ``c_b = min(1, C / ||g_b||)`` then weight the instantiated per-example gradients where they take no
   more memory than the layer's ``A`` and ``G`` (fastDP's "MixOpt"), and elsewhere enter one weight-gradient call
   per layer with ``c`` folded into ``G``: ``sum_b c_b g_bᵀ a_b`` (for a convolution,
   ``torch.nn.grad.conv2d_weight(A, shape, c * G)``).

Supported: ``Linear`` (any leading dimensions: sequences are positions), ``Conv1d``/``Conv2d`` (stride, padding,
dilation, groups), ``Embedding``, ``LayerNorm``, ``GroupNorm``, and the weight-standardised
:class:`~lightning_nt.common.StandardizedConv2d` (its raw weight's per-example norm is exact from ghost
quantities; the chain rule through the standardisation is applied once, to the clipped sum). Layers of other
types fall back to Opacus's per-sample rule for that layer inside the same backward; a parameter that no rule
covers, or one shared by two layers, is refused before anything is computed.

Examples:
    >>> _ = torch.manual_seed(0)
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> clipper = BookKeepingClipper(net, max_grad_norm=1.0)
    >>> x, y = torch.randn(8, 3), torch.randint(2, (8,))
    >>> with clipper.recording():
    ...     nn.functional.cross_entropy(net(x), y).backward()
    >>> norms = clipper.clip_and_sum(batch_size=8)  # .grad: the sum of the clipped per-example gradients
    >>> bool(net[0].weight.grad.norm() <= 8 * 1.0), tuple(norms.shape)
    (True, (8,))
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import Tensor, nn

from lightning_nt.common.layers import StandardizedConv2d
from lightning_nt.common.validation import Rule, above, at_least, checked_arguments
from lightning_nt.privacy.grad_samplers import standardization_backward

__all__ = ["BookKeepingClipper", "conv_per_example_grads", "outer_product_norms", "supported_layer_types"]

_DIRECT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)


def supported_layer_types() -> tuple[type, ...]:
    """Layer types with a book-keeping rule of their own (others need an Opacus per-sample rule)."""
    return (*_DIRECT_TYPES, StandardizedConv2d)


ClippedSum = Callable[[Tensor, "Tensor | None"], Tensor]
"""``(weights, keep) -> sum``: each unit's weight (its clip factor) and, unless ``keep`` is ``None``, per unit
whether to keep it at all (a unit with a non-finite gradient is masked out, not multiplied by zero: ``nan * 0`` is
``nan``)."""


@dataclass
class _Record:
    """What one layer saw during the forward/backward passes: inputs and output gradients, one per call.

    Once every call's output gradient has arrived (in the backward pass) the layer's pieces are formed and the
    tensors are let go, so the activations are freed as the backward pass proceeds, as in an ordinary one.
    """

    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)  # StandardizedConv2d only: Y = w_hat * A (bias removed)
    grads: list[Tensor | None] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    rows: int = 0
    pieces: list[_Piece] | None = None


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
        norm_dtype: dtype of the norm computations and clip factors (fp32 also when training in bf16).
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
        self.layers = _layers_of(module)
        self._trainable = {id(p) for layer in self.layers for p in layer.parameters(recurse=False) if p.requires_grad}
        self._records: dict[nn.Module, _Record] = {}
        self._recording = False
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
        self._records = {layer: _Record() for layer in self.layers}
        self._frozen = [p for layer in self.layers for p in layer.parameters(recurse=False) if self.trainable(p)]
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
        self._records = {layer: _Record() for layer in self.layers} if self._recording else {}
        self._carried, self.last_norms = {}, None

    def _keep(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled():
            return None
        record = self._records[layer]
        source = inputs[0]
        record.inputs.append(source.detach())
        record.versions.append(source._version)
        if type(layer) is StandardizedConv2d:
            without_bias = output if layer.bias is None else output - layer.bias.view(1, -1, 1, 1)
            record.outputs.append(without_bias.detach())
        index = len(record.grads)
        record.grads.append(None)
        replaced = None
        if not output.requires_grad:  # nothing upstream requires grad: the graph starts here
            output = output.detach().requires_grad_(True)
            replaced = output.clone()  # a non-leaf, so in-place operations after this layer stay allowed

        def keep_gradient(gradient: Tensor) -> None:
            record.grads[index] = gradient.detach()
            if record.inputs[0].shape[0] and self._problem(layer, record) is None:  # else clip_and_sum names it
                self._form(layer, record)

        output.register_hook(keep_gradient)
        return replaced

    def _problem(self, layer: nn.Module, record: _Record, batch_size: int | None = None) -> str | None:
        """Why the layer's per-example gradients can't be formed (yet) from its record, or None."""
        name = self._name(layer) if batch_size is not None else ""  # the name is only needed for an error
        if any(grad is None for grad in record.grads):
            return (
                f"Layer {name} ran in the forward pass but received no gradient: its output does not reach the "
                "loss. Book-keeping clipping needs every recorded call to be part of the backward pass."
            )
        rows = {tensor.shape[0] for tensor in record.inputs} | ({record.rows} if record.pieces is not None else set())
        expected = {batch_size} if batch_size is not None else {next(iter(rows))}  # in the backward: consistent rows
        if rows != expected or next(iter(expected)) % self.group_size:
            seen = " and ".join(map(str, sorted(rows)))
            return (
                f"Layer {name} saw {seen} rows in dimension 0 where the batch has {batch_size}: per-example "
                "gradients need the batch in dimension 0 (e.g. batch_first=True)."
            )
        if any(tensor._version != version for tensor, version in zip(record.inputs, record.versions)):
            return (
                f"The input of layer {name} was modified in place after the layer used it, so its "
                "per-example gradients can't be formed from it; avoid the in-place operation."
            )
        return None

    def _form(self, layer: nn.Module, record: _Record) -> None:
        """The layer's pieces (norms now, what the clipped sum needs kept); its recorded tensors let go."""
        dtype = self.norm_dtype
        inputs = [a.to(dtype) if a.is_floating_point() else a for a in record.inputs]  # embedding indices stay
        grads = [g.to(dtype) for g in record.grads if g is not None]
        record.rows = record.inputs[0].shape[0]
        with torch.autocast(record.inputs[0].device.type, enabled=False):  # in norm_dtype, whatever the backward's
            record.pieces = _pieces_for(layer, inputs, grads, [y.to(dtype) for y in record.outputs], self)
        record.inputs, record.outputs, record.grads = [], [], []

    def clip_and_sum(self, batch_size: int, carry: bool = False) -> Tensor:
        """Set every trainable parameter's ``.grad`` to the sum over privacy units of their clipped gradients.

        Call after the backward pass of a :meth:`recording` block, with the number of rows the module saw. With
        ``carry=True`` the sums are kept here instead (a physical part of a larger logical batch) and added to the
        ``.grad`` of the next call without ``carry``. A unit whose gradient is not finite contributes zero (its norm
        is returned as NaN/inf; the sensitivity stays ``max_grad_norm``). Returns each unit's gradient norm before
        clipping (in ``norm_dtype``). The recorded activations are freed.
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
            sums = {piece.parameter: piece.clipped_sum(factors * scale, keep) for piece in pieces}
            self._deliver(sums, carry)
            self.last_norms = norms
            return norms
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

    def _pieces(self, layer: nn.Module, batch_size: int) -> list[_Piece]:
        record = self._records.get(layer)
        if record is None or (record.pieces is None and not record.inputs):  # the layer did not run
            return []
        problem = self._problem(layer, record, batch_size)
        if problem is not None:
            raise RuntimeError(problem)
        if record.pieces is None:
            self._form(layer, record)
        return record.pieces or []

    def _name(self, layer: nn.Module) -> str:
        return next((name for name, module in self.module.named_modules() if module is layer), type(layer).__name__)

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


@dataclass
class _Piece:
    """One parameter's contribution: per-unit squared gradient norms, and how to form the sum of clipped gradients."""

    parameter: nn.Parameter
    squared_norms: Tensor
    clipped_sum: ClippedSum


def _masked(tensor: Tensor, keep: Tensor | None) -> Tensor:
    """``tensor`` with the rows (dimension 0) not in ``keep`` set to zero (all of them kept if ``keep`` is None)."""
    return tensor if keep is None else torch.where(keep.view(-1, *([1] * (tensor.ndim - 1))), tensor, 0.0)


def _per_unit_piece(
    clipper: BookKeepingClipper,
    parameter: nn.Parameter,
    per_row: Tensor,
    standardization: _Standardization | None = None,
) -> _Piece:
    """Per-row gradients formed outright (biases, norm layers, Opacus's rules, kernels whose per-example gradients
    cost less than their Gram matrices and take less memory than the layer's activations): norms and the clipped sum
    straight from them. With ``standardization``, they are gradients with respect to a standardised kernel: the raw
    weight's norms follow from them, and the chain rule is applied once, to the clipped sum."""
    per_unit = clipper.unit_sum(per_row)

    def clipped_sum(weights: Tensor, keep: Tensor | None) -> Tensor:
        units = _masked(per_unit, keep)
        total = (weights @ units.flatten(1)).view(units.shape[1:])
        return total if standardization is None else standardization_backward(parameter, total)

    return _Piece(parameter, _kernel_squared_norms(per_unit, standardization), clipped_sum)


def _kernel_squared_norms(per_unit: Tensor, standardization: _Standardization | None) -> Tensor:
    """``[B, ...] -> [B]``: each unit's squared norm (of the raw weight's gradient, with ``standardization``)."""
    if standardization is None:
        return torch.linalg.vector_norm(per_unit.flatten(1), dim=1).square()
    channels = per_unit.flatten(2)  # [B, p, d]
    squares = torch.linalg.vector_norm(channels, dim=2).square() / standardization.s.square()
    s1, s2 = channels.sum(2), (channels * standardization.standardized).sum(2)  # as einsum: a slow bmm on a CPU
    return squares.sum(1) + standardization.correction(s1, s2)


class _Standardization:
    """Per output channel of a weight-standardised kernel ``w_hat = (w - mean) / s``, ``s = sigma + eps`` over its
    ``d`` inputs, and ``g`` an example's gradient with respect to ``w_hat``: the raw gradient is
    ``(g - mean(g)) / s - w_hat S2 / (d sigma)`` with ``S2 = g · w_hat``; as ``w_hat`` is centred and
    ``|w_hat|² = d sigma² / s²``, its squared norm is ``(|g|² - S1²/d) / s² + S2² (1/s² - 2/(s sigma)) / d`` with
    ``S1 = sum(g)``."""

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        flat = weight.detach().to(dtype).flatten(1)
        self.fan_in = flat.shape[1]
        self.sigma = flat.std(1, unbiased=False)
        self.s = self.sigma + 1e-5  # as in the forward
        self.standardized = (flat - flat.mean(1, keepdim=True)) / self.s[:, None]  # [p, d]

    def correction(self, s1: Tensor, s2: Tensor) -> Tensor:
        """The raw squared norm minus ``sum(|g|² / s²)`` over channels, per unit, from ``S1``, ``S2`` (``[B, p]``)."""
        d, s, sigma = self.fan_in, self.s, self.sigma
        return (-s1.square() / (d * s.square()) + s2.square() * (1 / s.square() - 2 / (s * sigma)) / d).sum(1)


def outer_product_norms(
    patches: Tensor, grads: Tensor, method: Literal["auto", "ghost", "instantiate"] = "auto"
) -> Tensor:
    """``||sum_t g_bt u_btᵀ||²`` for every ``b``, from ``patches [B, T, d]`` and ``grads [B, T, p]``.

    ``"ghost"`` sums ``(U Uᵀ) ∘ (G Gᵀ)`` over position pairs (``B T² (d + p)`` work), ``"instantiate"`` forms the
    ``p x d`` matrices (``B T d p``); ``"auto"`` takes the cheaper (Bu et al.'s mixed ghost norm).

    Examples:
        >>> u, g = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
        >>> torch.allclose(outer_product_norms(u, g, "ghost"), outer_product_norms(u, g, "instantiate"))
        True
    """
    positions, d, p = patches.shape[1], patches.shape[2], grads.shape[2]
    if method == "auto":
        if positions == 1:
            return patches.square().sum((1, 2)) * grads.square().sum((1, 2))
        method = "instantiate" if _instantiate(positions, d, p) else "ghost"
    if method == "ghost":
        gram_a = torch.bmm(patches, patches.transpose(1, 2))
        gram_g = torch.bmm(grads, grads.transpose(1, 2))
        return (gram_a * gram_g).sum((1, 2))
    return torch.bmm(grads.transpose(1, 2), patches).square().sum((1, 2))


def _instantiate(positions: int, d: int, p: int) -> bool:
    """Whether forming a ``p x d`` per-example gradient over ``positions`` costs less than its Gram matrices."""
    return positions > 1 and positions * (d + p) >= d * p


def _keep_per_example(kernel: int, activations: int) -> bool:
    """Whether a row's instantiated kernel gradient takes no more memory than the row's activations that would
    otherwise be kept for the clipped sum (its input and output gradient): reuse it then (fastDP's "MixOpt")."""
    return kernel <= activations


def _standardized_ghost_norms(
    clipper: BookKeepingClipper, standardization: _Standardization, patches: Tensor, grads: Tensor, outputs: Tensor
) -> Tensor:
    """The raw weight of a weight-standardised convolution: its per-example norm, exact from ghost quantities
    (:class:`_Standardization`). ``sum |g|²/s²`` is the outer-product norm with ``G / s``; ``S1 = sum_t G_t (sum of
    patch u_t)`` and ``S2 = sum_t G_t Y_t``, ``Y`` the convolution's output without bias."""
    patches, grads = clipper.units(patches), clipper.units(grads)  # [B, T, d], [B, T, p] (w.r.t. w_hat)
    s1 = torch.einsum("btp,bt->bp", grads, patches.sum(2))
    s2 = (grads * clipper.units(outputs)).sum(1)
    return outer_product_norms(patches, grads / standardization.s) + standardization.correction(s1, s2)


def _embedding_piece(clipper: BookKeepingClipper, layer: nn.Embedding, indices: Tensor, grads: Tensor) -> _Piece:
    """An embedding table: per-unit norms by the ghost identity over token positions (equal tokens interact)."""
    if layer.padding_idx is not None:  # PyTorch gives the padding row no gradient
        grads = grads * (indices != layer.padding_idx)[..., None]
    indices = clipper.units(indices[..., None])[..., 0]  # [B, T]
    grads = clipper.units(grads)  # [B, T, dim]
    same = (indices[:, :, None] == indices[:, None, :]).to(grads.dtype)
    squared_norms = (same * torch.bmm(grads, grads.transpose(1, 2))).sum((1, 2))

    def clipped_sum(weights: Tensor, keep: Tensor | None) -> Tensor:
        weighted = (_masked(grads, keep) * weights[:, None, None]).flatten(0, 1)
        total = torch.zeros(layer.weight.shape, dtype=weighted.dtype, device=weighted.device)
        return total.index_add_(0, indices.flatten(), weighted)

    return _Piece(layer.weight, squared_norms, clipped_sum)


def _layers_of(module: nn.Module) -> list[nn.Module]:
    """The layers that own trainable parameters, checked to be covered by a rule and not to share parameters."""
    layers, owner = [], {}
    for name, layer in module.named_modules():
        own = [(n, p) for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        for parameter_name, parameter in own:
            full = f"{name}.{parameter_name}" if name else parameter_name
            if id(parameter) in owner:
                raise ValueError(
                    f"Parameter {full} is the same tensor as {owner[id(parameter)]}: book-keeping clipping forms each "
                    "layer's per-example norm separately, which is wrong for a tied parameter. Use "
                    "grad_sample_mode='hooks' for this model."
                )
            owner[id(parameter)] = full
        if type(layer) not in supported_layer_types() and type(layer) not in GradSampleModule.GRAD_SAMPLERS:
            raise ValueError(
                f"Layer {name or type(layer).__name__} ({type(layer).__name__}) has trainable parameters but neither "
                "a book-keeping nor an Opacus per-sample rule. Use grad_sample_mode='hooks' (Opacus falls back to "
                "functorch for it), or freeze its parameters."
            )
        _check_options(name, layer)
        layers.append(layer)
    return layers


def _check_options(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Embedding) and (layer.sparse or layer.scale_grad_by_freq):
        raise ValueError(f"Embedding {name}: `sparse` and `scale_grad_by_freq` are not supported under DP-SGD.")
    if type(layer) in (nn.Conv1d, nn.Conv2d, StandardizedConv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(
                f"Convolution {name}: padding={layer.padding!r}, padding_mode={layer.padding_mode!r} are not "
                "supported; give numeric padding with padding_mode='zeros'."
            )
        if type(layer) is StandardizedConv2d and layer.groups != 1:
            raise ValueError(f"Weight-standardised convolution {name}: groups != 1 is not supported.")


def _pieces_for(
    layer: nn.Module, inputs: list[Tensor], grads: list[Tensor], outputs: list[Tensor], clipper: BookKeepingClipper
) -> list[_Piece]:
    kind = type(layer)
    if kind is nn.Linear:
        return _linear_pieces(layer, inputs, grads, clipper)
    if kind in (nn.Conv1d, nn.Conv2d, StandardizedConv2d):
        return _conv_pieces(layer, inputs, grads, outputs, clipper)
    if kind is nn.Embedding:
        if not clipper.trainable(layer.weight):
            return []
        indices = _join([i.reshape(i.shape[0], -1) for i in inputs])
        gradient = _join([g.reshape(g.shape[0], -1, g.shape[-1]) for g in grads])
        return [_embedding_piece(clipper, layer, indices, gradient)]
    if kind in (nn.LayerNorm, nn.GroupNorm):
        return _normalization_pieces(layer, inputs, grads, clipper)
    return _opacus_pieces(layer, inputs, grads, clipper)


def _join(tensors: list[Tensor], dim: int = 1) -> Tensor:
    """The calls of a layer as more positions (no copy for the usual single call)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _total(tensors: list[Tensor]) -> Tensor:
    """The sum of a layer's calls' contributions (``sum()`` would start with a copy of the first)."""
    return sum(tensors[1:], tensors[0])


def _linear_pieces(
    layer: nn.Linear, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[_Piece]:
    patches = _join([a.reshape(a.shape[0], -1, a.shape[-1]) for a in inputs])  # [N, T, d]
    gradient = _join([g.reshape(g.shape[0], -1, g.shape[-1]) for g in grads])  # [N, T, p]
    pieces: list[_Piece] = []
    if clipper.trainable(layer.weight):
        if _instantiate(patches.shape[1], layer.in_features, layer.out_features):  # then no larger than T (d + p)
            pieces.append(_per_unit_piece(clipper, layer.weight, torch.bmm(gradient.transpose(1, 2), patches)))
        else:

            def weight_sum(row_weights: Tensor, keep: Tensor | None) -> Tensor:
                weighted = _masked(gradient, keep) * row_weights[:, None, None]
                return torch.einsum("ntp,ntd->pd", weighted, _masked(patches, keep))

            squared_norms = outer_product_norms(clipper.units(patches), clipper.units(gradient))
            pieces.append(_Piece(layer.weight, squared_norms, clipper.per_rows(weight_sum)))
    if clipper.trainable(layer.bias):
        pieces.append(_per_unit_piece(clipper, layer.bias, gradient.sum(1)))
    return pieces


def _conv_pieces(
    layer: nn.Conv1d | nn.Conv2d,
    inputs: list[Tensor],
    grads: list[Tensor],
    outputs: list[Tensor],
    clipper: BookKeepingClipper,
) -> list[_Piece]:
    pieces: list[_Piece] = []
    if clipper.trainable(layer.weight):
        pieces.append(_conv_weight_piece(layer, inputs, grads, outputs, clipper))
    if clipper.trainable(layer.bias):
        pieces.append(_per_unit_piece(clipper, layer.bias, _total([g.flatten(2).sum(2) for g in grads])))
    return pieces


def _conv_weight_piece(
    layer: nn.Conv1d | nn.Conv2d,
    inputs: list[Tensor],
    grads: list[Tensor],
    outputs: list[Tensor],
    clipper: BookKeepingClipper,
) -> _Piece:
    """Norms from instantiated per-example kernels or from ghost Gram matrices, whichever costs less; the clipped sum
    from the per-example kernels if they are no larger than the activations, else by one weight-gradient call."""
    standardization = _Standardization(layer.weight, grads[0].dtype) if type(layer) is StandardizedConv2d else None
    positions = sum(g[0, 0].numel() for g in grads)
    kernel, out_per_group = layer.weight[0].numel(), layer.out_channels // layer.groups
    if _instantiate(positions, kernel, out_per_group):
        per_row = _total([conv_per_example_grads(layer, a, g) for a, g in zip(inputs, grads)])
        activations = sum(a[0].numel() + g[0].numel() for a, g in zip(inputs, grads))
        if _keep_per_example(layer.weight.numel(), activations):
            return _per_unit_piece(clipper, layer.weight, per_row, standardization)
        squared_norms = _kernel_squared_norms(clipper.unit_sum(per_row), standardization)
    else:
        squared_norms = _conv_ghost_norms(layer, inputs, grads, outputs, standardization, clipper)
    weight_grad = _weight_gradient_of(layer)

    def weight_sum(row_weights: Tensor, keep: Tensor | None) -> Tensor:
        calls = [
            weight_grad(
                _masked(a, keep),
                layer.weight.shape,
                _masked(g, keep) * row_weights.view(-1, *([1] * (g.ndim - 1))),
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.groups,
            )
            for a, g in zip(inputs, grads)
        ]
        total = _total(calls)
        return total if standardization is None else standardization_backward(layer.weight, total)

    return _Piece(layer.weight, squared_norms, clipper.per_rows(weight_sum))


def _conv_ghost_norms(
    layer: nn.Conv1d | nn.Conv2d,
    inputs: list[Tensor],
    grads: list[Tensor],
    outputs: list[Tensor],
    standardization: _Standardization | None,
    clipper: BookKeepingClipper,
) -> Tensor:
    """Per-unit squared norms of a convolution's kernel gradient by ghost Gram matrices, group by group."""
    groups = layer.groups
    unfolded = [_unfold(a, layer) for a in inputs]  # [N, groups, d_g, T] per call; calls are more positions
    per_group = [g.reshape(g.shape[0], groups, layer.out_channels // groups, -1) for g in grads]
    norms = []
    for group in range(groups):
        patches = _join([u[:, group].transpose(1, 2) for u in unfolded])  # [N, T, d_g], a view for one call
        gradient = _join([g[:, group].transpose(1, 2) for g in per_group])
        if standardization is not None:  # groups == 1 (checked when the clipper is built)
            produced = _join([y.flatten(2).transpose(1, 2) for y in outputs])
            norms.append(_standardized_ghost_norms(clipper, standardization, patches, gradient, produced))
        else:
            norms.append(outer_product_norms(clipper.units(patches), clipper.units(gradient)))
    return _total(norms)


def conv_per_example_grads(
    layer: nn.Conv1d | nn.Conv2d,
    inputs: Tensor,
    grads: Tensor,
    method: Literal["auto", "grouped", "unfold"] = "auto",
) -> Tensor:
    """Every example's gradient with respect to a convolution's kernel, ``[N, *layer.weight.shape]``.

    ``"grouped"``: one weight-gradient call with the examples as groups (Rochette et al. 2019): no im2col copy, the
    fastest on a CPU. ``"unfold"``: im2col as a strided view and one copy, then one batched product (one kernel per
    step on a GPU, where many-group weight gradients are slow). ``"auto"``: grouped on a CPU, unfold elsewhere.

    Examples:
        >>> conv, x = nn.Conv2d(2, 3, 3, padding=1).double(), torch.randn(4, 2, 5, 5, dtype=torch.float64)
        >>> g = torch.randn_like(conv(x))
        >>> grouped, unfolded = (conv_per_example_grads(conv, x, g, method) for method in ("grouped", "unfold"))
        >>> tuple(grouped.shape), torch.allclose(grouped, unfolded)
        ((4, 3, 2, 3, 3), True)
    """
    if method == "auto":
        method = "grouped" if inputs.device.type == "cpu" else "unfold"
    rows, groups = inputs.shape[0], layer.groups
    if method == "unfold":
        patches = _unfold(inputs, layer)  # [N, groups, d_g, T]
        per_group = grads.reshape(rows, groups, layer.out_channels // groups, -1)  # [N, groups, p_g, T]
        return torch.matmul(per_group, patches.transpose(2, 3)).reshape(rows, *layer.weight.shape)
    stacked = _weight_gradient_of(layer)(
        inputs.reshape(1, -1, *inputs.shape[2:]),
        (rows * layer.out_channels, *layer.weight.shape[1:]),
        grads.reshape(1, -1, *grads.shape[2:]),
        layer.stride,
        layer.padding,
        layer.dilation,
        rows * groups,
    )
    return stacked.view(rows, *layer.weight.shape)


def _weight_gradient_of(layer: nn.Conv1d | nn.Conv2d) -> Callable[..., Tensor]:
    return torch.nn.grad.conv2d_weight if isinstance(layer, nn.Conv2d) else torch.nn.grad.conv1d_weight


def _normalization_pieces(
    layer: nn.LayerNorm | nn.GroupNorm, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[_Piece]:
    weight_rows: Tensor | float = 0.0
    bias_rows: Tensor | float = 0.0
    for a, g in zip(inputs, grads):
        if isinstance(layer, nn.LayerNorm):
            normalized = F.layer_norm(a, layer.normalized_shape, eps=layer.eps)
            reduce = tuple(range(1, a.ndim - len(layer.normalized_shape)))
        else:
            normalized = F.group_norm(a, layer.num_groups, eps=layer.eps)
            reduce = tuple(range(2, a.ndim))
        weight_rows = weight_rows + _sum_over(normalized * g, reduce)
        bias_rows = bias_rows + _sum_over(g, reduce)
    pieces: list[_Piece] = []
    if clipper.trainable(layer.weight):
        pieces.append(_per_unit_piece(clipper, layer.weight, weight_rows))
    if clipper.trainable(layer.bias):
        pieces.append(_per_unit_piece(clipper, layer.bias, bias_rows))
    return pieces


def _sum_over(tensor: Tensor, dims: tuple[int, ...]) -> Tensor:
    return tensor.sum(dims) if dims else tensor  # an empty tuple would sum over every dimension


def _opacus_pieces(
    layer: nn.Module, inputs: list[Tensor], grads: list[Tensor], clipper: BookKeepingClipper
) -> list[_Piece]:
    rule = GradSampleModule.GRAD_SAMPLERS[type(layer)]
    per_row: dict[int, tuple[nn.Parameter, Tensor]] = {}
    for a, g in zip(inputs, grads):
        for parameter, samples in rule(layer, [a], g).items():
            previous = per_row.get(id(parameter))
            per_row[id(parameter)] = (parameter, samples if previous is None else previous[1] + samples)
    return [_per_unit_piece(clipper, p, samples) for p, samples in per_row.values() if clipper.trainable(p)]


def _unfold(inputs: Tensor, layer: nn.Conv1d | nn.Conv2d) -> Tensor:
    """im2col as one strided view and one copy: ``[N, groups, C_g * prod(kernel), T]``.

    ``F.unfold`` launches one kernel per example on CUDA and has no 1-D form.
    """
    spatial = inputs.ndim - 2
    padding = [p for p in reversed(layer.padding) for _ in range(2)]
    padded = F.pad(inputs, padding) if any(padding) else inputs
    rows, channels = padded.shape[:2]
    kernel, stride, dilation = layer.kernel_size, layer.stride, layer.dilation
    out_sizes = [(padded.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(spatial)]
    strides = padded.stride()
    view = padded.as_strided(
        (rows, channels, *kernel, *out_sizes),
        (
            strides[0],
            strides[1],
            *(strides[2 + i] * dilation[i] for i in range(spatial)),
            *(strides[2 + i] * stride[i] for i in range(spatial)),
        ),
    )
    return view.reshape(rows, layer.groups, (channels // layer.groups) * math.prod(kernel), math.prod(out_sizes))
