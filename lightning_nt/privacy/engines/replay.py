"""The ``torch.func`` re-run that forms the per-example gradients of a layer without a per-sample rule (every layer
under ``grad_sample_mode="functorch"``), of the layer as it was at each call, checked against that call.

Opacus forms such a layer's per-example gradients in the backward pass by re-running its forward pass on each
example's recorded input under ``vmap(grad(...))``, on a copy of the layer made when the engine was built: state the
layer had at the call but not the copy (an attribute its parent set since, a factor set around the call, a layer
called twice with two factors, a forward hook added since) made the update the clipped sum of another computation's
gradients, bounded but not the step's, and silent. Here each call of such a layer records a shallow snapshot of the
layer as the call begins (:func:`snapshot_at_call`: its own attribute dictionaries, the attribute objects shared)
and its output (:func:`record_call`), beside Opacus's record of its input; the backward pass re-runs that snapshot,
which returns its output at no extra pass (``grad(..., has_aux=True)``); a re-run that does not reproduce the
recorded output (its shape, or its values beyond the rounding of the precision in play: :func:`tolerance`) is refused
by name before any noise. What no snapshot carries is refused so: a per-example tensor attribute (a FiLM conditioning
``[B, d]`` would be applied whole to each example's re-run, mixing the examples' data), an attribute's tensor or
object changed in place between the call and the backward pass.

Example::

    layer.register_forward_pre_hook(snapshot_at_call(lambda: engine_is_on))
    layer.ft_compute_sample_grad = CheckedReplay("net.0", layer)  # after Opacus's hooks are attached
    # forward: record_call(layer, output, recorded) from the hook that records its input; backward: Opacus re-runs
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
from opacus.grad_sample import grad_sample_module
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_nt.common.errors import explained_errors

__all__ = [
    "RECORDED_CALLS",
    "SNAPSHOTS",
    "CheckedReplay",
    "record_call",
    "replaying",
    "snapshot_at_call",
    "tolerance",
    "without_opacus_copies",
]

RECORDED_CALLS = "replayed_calls"
"""The attribute of a re-run layer holding its calls' records (a stack, popped as Opacus pops ``activations``)."""

SNAPSHOTS = "replay_snapshots"
"""The attribute of a re-run layer holding the snapshots of its calls under way (taken as each begins)."""

_ENGINE_PACKAGES = ("opacus.", "lightning_nt.privacy.")
"""Where the hooks a snapshot leaves out are defined: the DP engines' own (they must not run in a re-run)."""

_TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
"""Largest relative difference between a re-run's output and its call's accepted as rounding, by the least precise
floating dtype in play (see :func:`tolerance`)."""


_UNDER_WAY = [0]  # re-runs under way


def replaying() -> bool:
    """Whether a re-run is under way: the engines' hooks on a module it reaches outside its snapshot (a trainable
    layer held in a plain list, shared with the model) must not record or check that module's re-run calls."""
    return _UNDER_WAY[0] > 0


class _Call(NamedTuple):
    """What a re-run must reproduce: the layer as the call began, its output (``None``: not a tensor) and the least
    precise dtype it computed in."""

    layer: nn.Module
    output: Tensor | None
    precision: torch.dtype
    autocast: torch.dtype | None = None  # the autocast dtype in force at the call, re-entered by the re-run


def snapshot_at_call(watching: Callable[[], bool]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    """A forward pre-hook pushing a snapshot of the layer (:func:`_snapshot`) as each call begins, while
    ``watching()`` and recording gradients (``None`` otherwise), for :func:`record_call` to take when it ends."""

    def take(layer: nn.Module, inputs: tuple[Any, ...]) -> None:
        if replaying():
            return
        recording = watching() and torch.is_grad_enabled()
        vars(layer).setdefault(SNAPSHOTS, []).append(_snapshot(layer) if recording else None)

    return take


def record_call(layer: nn.Module, output: Any, recorded: bool) -> None:
    """Take the snapshot of the call of ``layer`` that just ended; if Opacus ``recorded`` its input, push the call's
    record (the snapshot, the output) beside it. A layer without :func:`snapshot_at_call` (one of PyTorch's or
    Opacus's with a per-sample rule, re-run under ``grad_sample_mode="functorch"`` only: its forward changes no state
    of its own) is snapshot as the call ends."""
    snapshots = vars(layer).get(SNAPSHOTS)
    snapshot = snapshots.pop() if snapshots else None
    if not recorded:
        return
    if snapshot is None:
        snapshot = _snapshot(layer)
    calls = vars(layer).setdefault(RECORDED_CALLS, [])
    if not isinstance(output, Tensor):
        calls.append(_Call(snapshot, None, torch.float64))
        return
    device = output.device.type
    autocast = torch.get_autocast_dtype(device) if _autocasting(device) else None
    calls.append(_Call(snapshot, output.detach(), _precision_at_call(output), autocast))


def _snapshot(layer: nn.Module) -> nn.Module:
    """``layer`` and its submodules as they are now, for a re-run: each a new module of the same class with a copy of
    its attribute dictionary (attribute objects, parameters and buffers shared; lists, dicts and sets copied, shallow)
    and of its parameter, buffer and submodule dictionaries, so the re-run's own writes stay in the snapshot.

    Left out: the engines' hooks (Opacus's and this package's), every backward hook (they can't run under
    ``torch.func``, and don't change an output), the records of the calls, and ``layer``'s own forward pre-hooks,
    which have already made the input Opacus recorded. The user's forward hooks and their pre-hooks inside stay.
    """
    copies: dict[int, nn.Module] = {}

    def copy_of(module: nn.Module) -> nn.Module:
        if id(module) in copies:  # a submodule reached twice (shared) is one copy
            return copies[id(module)]
        copies[id(module)] = copy = object.__new__(type(module))
        vars(copy).update({key: _own(value) for key, value in vars(module).items() if key not in _LEFT_OUT})
        vars(copy).update(
            _parameters=dict(module._parameters),
            _buffers=dict(module._buffers),
            _modules={name: child if child is None else copy_of(child) for name, child in module._modules.items()},
            _forward_hooks=_users_hooks(module._forward_hooks),
            _forward_pre_hooks=_users_hooks(module._forward_pre_hooks),
            _backward_hooks=OrderedDict(),
            _backward_pre_hooks=OrderedDict(),
        )
        return copy

    snapshot = copy_of(layer)
    vars(snapshot)["_forward_pre_hooks"] = OrderedDict()
    return snapshot


def _own(value: Any) -> Any:
    """An attribute as a snapshot holds it: a list, dict or set copied (shallow: the forward's writes into it, such as
    ``self.kept.append(out)``, would put tensors of the re-run's ``vmap`` into the user's container), anything else
    shared."""
    return value.copy() if type(value) in (list, dict, set) else value


_LEFT_OUT = frozenset({RECORDED_CALLS, SNAPSHOTS, "activations", "max_batch_len", "ft_compute_sample_grad"})


def _users_hooks(hooks: dict[int, Callable[..., Any]]) -> OrderedDict[int, Callable[..., Any]]:
    """``hooks`` but those a DP engine defined (a function, bound method or ``functools.partial`` of one)."""
    return OrderedDict((key, hook) for key, hook in hooks.items() if not _engines(hook))


def _engines(hook: Callable[..., Any]) -> bool:
    while hasattr(hook, "func"):  # functools.partial
        hook = hook.func
    defined_in = getattr(getattr(hook, "__func__", hook), "__module__", None) or ""
    return defined_in.startswith(_ENGINE_PACKAGES)


def _precision_at_call(output: Tensor) -> torch.dtype:
    """The least precise floating dtype the call may have computed in: its output's, the autocast dtype if autocast
    was on, and TF32 (rounded like float16) for float32 matrix products and convolutions on a GPU that allows it."""
    dtypes = [output.dtype if output.is_floating_point() else torch.float64]
    device = output.device.type
    if _autocasting(device):
        dtypes.append(torch.get_autocast_dtype(device))
    if device == "cuda" and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
        dtypes.append(torch.float16)
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


def _autocasting(device: str) -> bool:
    return device in ("cuda", "cpu", "xpu") and torch.is_autocast_enabled(device)


def tolerance(precision: torch.dtype) -> float:
    """The relative difference accepted between a re-run's output and its call's: about a hundred units of rounding
    in float32 (1e-5: the re-run of one example and the call on the batch add up products in another order), one to
    a few in float16 and bfloat16 (1e-2, 3e-2: bfloat16's 8-bit mantissa rounds at 4e-3), where a state the re-run
    misses moves the output by far more (a factor, a conditioning vector: tens of percent)."""
    return _TOLERANCES.get(precision, 1e-5)


class CheckedReplay:
    """The per-example gradients of ``layer``'s parameters as Opacus's ``ft_compute_sample_grad`` forms them
    (``(parameters, inputs, backprops)`` -> one ``[B, *p.shape]`` gradient per parameter), from a re-run of the
    snapshot of the call (:func:`record_call`), each example's output checked against the call's; a random draw in
    the layer is named. An object, not a closure, so that a copy of the module (``copy.deepcopy``) re-runs its own
    layer's calls."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        self.name, self.layer, self.kind = name, layer, type(layer).__name__

    def __call__(self, parameters: list[Tensor], inputs: Tensor, backprops: Tensor) -> tuple[Tensor, ...]:
        name, kind = self.name, self.kind
        call = vars(self.layer)[RECORDED_CALLS].pop()
        _refuse_batch_attributes(name, kind, call.layer, len(inputs))
        names = [parameter_name for parameter_name, _ in self.layer.named_parameters()]  # the order of `parameters`
        mixed = inputs.is_floating_point() and inputs.dtype != parameters[0].dtype  # Opacus's autocast rule

        if call.autocast is not None:  # as the call computed: under its autocast
            autocast = torch.autocast(inputs.device.type, dtype=call.autocast)
        else:
            autocast = torch.autocast(inputs.device.type, dtype=inputs.dtype) if mixed else nullcontext()

        def example_loss(values: list[Tensor], example: Tensor, backprop: Tensor) -> tuple[Tensor, Tensor]:
            with autocast:
                output = functional_call(call.layer, dict(zip(names, values)), (example.unsqueeze(0),))
                _check_shape(name, kind, output, backprop.unsqueeze(0))
                return (output * backprop.unsqueeze(0)).sum(), output.detach()

        random_draw = _random_draw_explanation(name, kind)
        _UNDER_WAY[0] += 1
        try:
            with explained_errors(lambda text: "vmap: called random operation" in text, random_draw):
                gradients, outputs = vmap(grad(example_loss, has_aux=True), in_dims=(None, 0, 0))(
                    parameters, inputs, backprops
                )
        finally:
            _UNDER_WAY[0] -= 1
        _check_values(name, kind, outputs, call)
        return gradients


@contextmanager
def without_opacus_copies() -> Iterator[None]:
    """Skip, while Opacus's hooks are attached, its ``prepare_layer``: a deep copy of each layer it re-runs, made then
    and never used here (:class:`CheckedReplay` re-runs each call's snapshot). It held the layer's memory again (a
    whole LightningModule, whose own parameter makes it re-run) and failed on a tensor of an autograd graph held as
    an attribute ("Only Tensors created explicitly by the user ... support the deepcopy protocol")."""
    prepare_layer = grad_sample_module.prepare_layer
    grad_sample_module.prepare_layer = _prepared_by_the_engine
    try:
        yield
    finally:
        grad_sample_module.prepare_layer = prepare_layer


def _prepared_by_the_engine(layer: nn.Module, batch_first: bool = True) -> None:
    """Opacus's ``prepare_layer`` while :func:`without_opacus_copies`: the engine sets ``ft_compute_sample_grad``."""


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
    "step's gradient). Refused before any noise. The re-run sees the layer's parameters, its first input and its "
    "state as the call began: compute what differs per example inside the layer's forward from that input (not as "
    "an attribute holding the batch's values), and don't change an attribute's tensor or object in place before the "
    "backward pass; or give the layer a per-sample rule (opacus.grad_sample.register_grad_sampler), or use "
    "grad_sample_mode='bk' if it has a rule there."
)


def _refuse_batch_attributes(name: str, kind: str, snapshot: nn.Module, examples: int) -> None:
    """Refuse a snapshot holding a tensor with a row per example of the batch (not a parameter or buffer; also in a
    list, tuple or dict it holds): per-example state set from outside the layer (a conditioning ``[B, d]``, a mask
    sliced to the batch, ``cond[:len(x)]``). The re-run of one example can't tell its own row: it would take another
    example's (or all of them), and a difference in the output too small to see can carry a whole gradient, so no
    check of the output could show it (a batch of one example has no other to mix with)."""
    if examples < 2:
        return
    found = [
        f"{module_name + '.' if module_name else ''}{attribute}"
        for module_name, module in snapshot.named_modules()
        for attribute, value in vars(module).items()
        if attribute not in _MODULE_INTERNALS and any(_per_example(tensor, examples) for tensor in _tensors_in(value))
    ]
    if found:
        raise RuntimeError(
            f"Layer {name!r} ({kind}) holds {', '.join(found)}: a tensor with a row per example of the batch "
            f"({examples}), set from outside its forward pass. Opacus forms its per-example gradients by re-running "
            "that forward pass on one example at a time with torch.func, and the re-run can't tell which row is the "
            "example's own: another example's data would enter its gradient, so one example could move the update "
            f"by more than max_grad_norm. Refused before any noise. Pass per-example values to the layer as part of "
            "its first input (or compute them inside its forward from that input), or give the layer a per-sample "
            "rule (opacus.grad_sample.register_grad_sampler), or use grad_sample_mode='bk' if it has a rule there."
        )


_MODULE_INTERNALS = frozenset(vars(nn.Module()))
"""A module's own dictionaries (its parameters, buffers, submodules, hooks): not attributes set from outside."""


def _tensors_in(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [item for item in value if isinstance(item, Tensor)]
    if isinstance(value, dict):
        return [item for item in value.values() if isinstance(item, Tensor)]
    return []


def _per_example(tensor: Tensor, examples: int) -> bool:
    return not isinstance(tensor, nn.Parameter) and tensor.ndim > 0 and tensor.shape[0] == examples


def _check_shape(name: str, kind: str, output: Any, expected: Tensor) -> None:
    """Refuse an example's re-run output of another shape than its call's (inside ``vmap``: per-example shapes), or
    an output that is not one tensor (Opacus's re-run multiplies it by the gradient of the layer's output)."""
    if not isinstance(output, Tensor):
        raise RuntimeError(
            f"Layer {name!r} ({kind}) returns a {type(output).__name__}, not one tensor: Opacus forms its per-example "
            "gradients by re-running its forward pass with torch.func and takes its output to be one tensor. Return "
            "one tensor (a layer per output), or give the layer a per-sample rule "
            "(opacus.grad_sample.register_grad_sampler). Refused before any noise."
        )
    if output.shape != expected.shape:
        raise RuntimeError(
            f"Layer {name!r} ({kind}): Opacus forms its per-example gradients by re-running its forward pass on one "
            f"example at a time with torch.func, and that re-run gave an output of shape {tuple(output.shape)} per "
            f"example where the call gave {tuple(expected.shape)} (an attribute holding a whole batch, such as a "
            f"conditioning tensor set by the parent, is applied to every example in the re-run), {_FIX}"
        )


def _check_values(name: str, kind: str, outputs: Tensor, call: _Call) -> None:
    """Refuse re-run ``outputs`` farther from the call's than its precision's rounding (:func:`tolerance`), by the
    largest difference relative to the largest finite output of the same example (a few operations; the details only
    on a refusal). Entries that are not finite (scores masked with -inf) must be the call's exactly."""
    if call.output is None or call.output.ndim == 0 or not call.output.numel():
        return
    wide = torch.promote_types(call.output.dtype, torch.float32)
    recorded = call.output.reshape(len(call.output), -1).to(wide)
    replayed = outputs.reshape(recorded.shape).to(wide)
    finite = recorded.isfinite()
    same = (replayed == recorded) | (replayed.isnan() & recorded.isnan())
    difference = torch.where(finite, replayed - recorded, 0).abs().amax(dim=1)
    difference = torch.where((finite | same).all(dim=1), difference, torch.inf)  # a non-finite entry moved
    scale = torch.where(finite, recorded, 0).abs().amax(dim=1)
    departs = ~(difference <= tolerance(call.precision) * scale)  # a difference that is not finite departs too
    if not bool(departs.any()):
        return
    worst = float((difference[departs] / scale[departs]).nan_to_num(nan=torch.inf).max())
    raise RuntimeError(
        f"Layer {name!r} ({kind}): Opacus forms its per-example gradients by re-running its forward pass on one "
        f"example at a time with torch.func, and that re-run's output differs from the call's by up to {worst:.2g} "
        f"relative to the example's largest output (rounding in {str(call.precision)[6:]} allows "
        f"{tolerance(call.precision):.0e}): the layer's forward depends on state the re-run doesn't see (an "
        "attribute's tensor, list or dictionary changed in place since the call, a value read from outside the "
        f"layer and changed since), {_FIX}"
    )
