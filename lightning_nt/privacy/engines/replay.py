"""The ``torch.func`` re-run that forms the per-example gradients of a layer without a per-sample rule (every layer
under ``grad_sample_mode="functorch"``), checked against the call it stands for.

Opacus forms such a layer's per-example gradients in the backward pass by re-running its forward pass on each
example's recorded input under ``vmap(grad(...))``. The re-run sees only what it is given: state the layer had at the
call but the re-run lacks (an attribute set by its parent, a factor set around the call, a forward hook) would make
the update the clipped sum of another computation's gradients, bounded but not the step's, and silent. So every
call's output is recorded beside Opacus's record of its input (:func:`record_call`), the re-run returns its output
at no extra pass (``grad(..., has_aux=True)``), and a re-run that does not reproduce the recorded output (its shape,
or its values beyond the rounding of the precision in play: :func:`tolerance`) is refused by name before any noise.

Example::

    layer.ft_compute_sample_grad = checked_replay("net.0", layer)  # after Opacus's hooks are attached
    # forward: record_call(layer, output) from the hook that records its input; backward: Opacus calls the re-run
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_nt.common.errors import explained_errors

__all__ = ["RECORDED_CALLS", "checked_replay", "record_call", "tolerance"]

RECORDED_CALLS = "replayed_calls"
"""The attribute of a re-run layer holding its calls' records (a stack, popped as Opacus pops ``activations``)."""

_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
"""Largest relative difference between a re-run's output and its call's accepted as rounding, by the least precise
floating dtype in play (see :func:`tolerance`)."""


class _Call(NamedTuple):
    """What a re-run must reproduce: the call's output (``None``: not a tensor) and the precision it ran in."""

    output: Tensor | None
    precision: torch.dtype


def record_call(layer: nn.Module, output: Any) -> None:
    """Push one call's record on ``layer``'s stack, beside the input Opacus has just pushed on ``activations``."""
    calls = vars(layer).setdefault(RECORDED_CALLS, [])
    if not isinstance(output, Tensor):
        calls.append(_Call(None, torch.float64))
        return
    calls.append(_Call(output.detach(), _precision_at_call(output)))


def _precision_at_call(output: Tensor) -> torch.dtype:
    """The least precise floating dtype the call may have computed in: its output's, the autocast dtype if autocast
    was on, and TF32 (rounded like float16) for float32 matrix products and convolutions on a GPU that allows it."""
    dtypes = [output.dtype if output.is_floating_point() else torch.float64]
    device = output.device.type
    if device in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device):
        dtypes.append(torch.get_autocast_dtype(device))
    if device == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
        dtypes.append(torch.float16)
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


def tolerance(precision: torch.dtype) -> float:
    """The relative difference accepted between a re-run's output and its call's: about a hundred units of rounding
    in float32 (1e-5: the re-run of one example and the call on the batch add up products in another order), one to
    a few in float16 and bfloat16 (1e-2, 3e-2: bfloat16's 8-bit mantissa rounds at 4e-3), where a state the re-run
    misses moves the output by far more (a factor, a conditioning vector: tens of percent)."""
    return _TOLERANCES.get(precision, 1e-5)


def checked_replay(name: str, layer: nn.Module) -> Callable[[list[Tensor], Tensor, Tensor], tuple[Tensor, ...]]:
    """The per-example gradients of ``layer``'s parameters as Opacus's ``ft_compute_sample_grad`` forms them
    (``(parameters, inputs, backprops)`` -> one ``[B, *p.shape]`` gradient per parameter), each example's output
    checked against the recorded call (:func:`record_call`); a random draw in the layer is named."""
    stateless = copy.deepcopy(layer).to("meta")  # as Opacus's: the layer as it is when the engine is built
    kind = type(layer).__name__

    def replay(parameters: list[Tensor], inputs: Tensor, backprops: Tensor) -> tuple[Tensor, ...]:
        call = vars(layer)[RECORDED_CALLS].pop()
        names = [parameter_name for parameter_name, _ in layer.named_parameters()]  # the order of `parameters`
        mixed = inputs.is_floating_point() and inputs.dtype != parameters[0].dtype

        def example_loss(values: list[Tensor], example: Tensor, backprop: Tensor) -> tuple[Tensor, Tensor]:
            with torch.autocast(inputs.device.type, dtype=inputs.dtype) if mixed else nullcontext():
                output = functional_call(stateless, dict(zip(names, values)), (example.unsqueeze(0),))
                _check_shape(name, kind, output, backprop.unsqueeze(0))
                return (output * backprop.unsqueeze(0)).sum(), output.detach()

        random_draw = _random_draw_explanation(name, kind)
        with explained_errors(lambda text: "vmap: called random operation" in text, random_draw):
            gradients, outputs = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0))(
                parameters, inputs, backprops
            )
        if call.output is not None:
            _check_values(name, kind, outputs.reshape(call.output.shape), call)
        return gradients

    return replay


def _random_draw_explanation(name: str, kind: str) -> Callable[[RuntimeError], str]:
    """The explanation of torch's bare "vmap: called random operation" in the re-run of layer ``name``."""

    def explanation(error: RuntimeError) -> str:
        return (
            f"Layer {name!r} ({kind}) draws random numbers in its forward pass (e.g. F.dropout(x, p, "
            "training=self.training), torch.rand): Opacus forms its per-example gradients by re-running that "
            "forward pass with torch.func, which can't replay the draws. Refused before any noise. Draw outside "
            "the layer (dropout on its input or output, in the module that calls it), turn the draw off (p=0), or "
            "freeze its trainable parameters (requires_grad_(False))."
        )

    return explanation


_FIX = (
    "so its per-example gradients would be those of another computation (bounded by max_grad_norm, but not the "
    "step's gradient). Refused before any noise. The re-run sees the layer's parameters and its first input only: "
    "compute any other state inside the layer's forward from that input (not as an attribute its parent sets, or "
    "changes between calls, or per example), or give the layer a per-sample rule "
    "(opacus.grad_sample.register_grad_sampler), or use grad_sample_mode='bk' if it has a rule there."
)


def _check_shape(name: str, kind: str, output: Any, expected: Tensor) -> None:
    """Refuse an example's re-run output of another shape than its call's (inside ``vmap``: per-example shapes)."""
    if not isinstance(output, Tensor) or output.shape != expected.shape:
        found = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise RuntimeError(
            f"Layer {name!r} ({kind}): Opacus forms its per-example gradients by re-running its forward pass on one "
            f"example at a time with torch.func, and that re-run gave an output of shape {found} per example where "
            f"the call gave {tuple(expected.shape)} (an attribute holding a whole batch, such as a conditioning "
            f"tensor set by the parent, is applied to every example in the re-run), {_FIX}"
        )


def _check_values(name: str, kind: str, outputs: Tensor, call: _Call) -> None:
    """Refuse re-run ``outputs`` farther from the call's than its precision's rounding (:func:`tolerance`), by the
    largest difference relative to the largest output of the same example; an example whose call output is not
    finite is left out (its gradient is not finite either, and the optimizer drops it)."""
    wide = torch.promote_types(call.output.dtype, torch.float32)
    recorded, replayed = call.output.to(wide).flatten(1), outputs.to(wide).flatten(1)
    finite = recorded.isfinite().all(dim=1)
    scale = recorded.abs().amax(dim=1).clamp(min=torch.finfo(wide).tiny)
    relative = ((replayed - recorded).abs().amax(dim=1) / scale).nan_to_num(nan=torch.inf)
    worst = float(relative[finite].max()) if bool(finite.any()) else 0.0
    if worst > tolerance(call.precision):
        raise RuntimeError(
            f"Layer {name!r} ({kind}): Opacus forms its per-example gradients by re-running its forward pass on one "
            f"example at a time with torch.func, and that re-run's output differs from the call's by up to "
            f"{worst:.2g} relative to the example's largest output (rounding in {str(call.precision)[6:]} allows "
            f"{tolerance(call.precision):.0e}): the layer's forward depends on state the re-run doesn't see (an "
            "attribute set after the engine was built, a factor set around the call or changed between two calls, "
            f"a forward hook added since), {_FIX}"
        )
