"""Per-example clipping (a DP-SGD stage) with Opacus's hooks: every example's gradient is formed, then clipped.

``grad_sample_mode="hooks"`` (or ``"functorch"``): Opacus's per-sample-gradient hooks on the module
itself (no wrapper) fill ``p.grad_sample`` during the ordinary backward pass; the optimizer here clips and sums
them (in fp32), carrying the sums of earlier physical batches across Lightning's ``zero_grad`` (virtual steps).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleHooksFastGradientClipping
from opacus.layers import DPGRU, DPLSTM, DPRNN
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.utils.module_utils import trainable_modules, trainable_parameters
from torch import Tensor, nn

from lightning_nt.common import loss_from_output
from lightning_nt.privacy.agreement import AgreedReduction, Refuse, raise_refusal
from lightning_nt.privacy.book_keeping.record import (
    positional_input_refusal,
    second_backward_refusal,
    shared_input_advice,
)
from lightning_nt.privacy.book_keeping.rules import aliases_only, opacus_formed_parameters
from lightning_nt.privacy.engines.base import ClippingEngine
from lightning_nt.privacy.engines.replay import (
    CheckedReplay,
    record_call,
    replaying,
    snapshot_at_call,
    without_opacus_copies,
)

__all__ = ["OpacusHooksEngine"]


class _CarryClippedSums:
    """DPOptimizer that keeps the clipped sums of earlier physical batches across Lightning's ``zero_grad``.

    It also makes every example's contribution bounded by ``max_grad_norm`` whatever the batch holds: a parameter
    without per-example gradients (unused in this forward) counts as a zero gradient, and an example whose
    gradient is not finite contributes zero (counted over the run in ``nonfinite_examples``, without a sync).
    """

    views: int = 1
    nonfinite_examples: torch.Tensor | int = 0
    parameter_names: dict[int, str] = {}  # noqa: RUF012  (set per instance by the engine)

    def carry_clipped_sums(self) -> None:
        """Clip and sum the per-example gradients of the physical batch just back-propagated, and free them."""
        self.zero_for_unused_parameters()
        self.clip_and_accumulate()  # type: ignore[attr-defined]
        carried = getattr(self, "_carried", None) or {}
        for p in self.params:  # type: ignore[attr-defined]
            carried[p] = carried[p] + p.summed_grad if p in carried else p.summed_grad
            p.summed_grad, p.grad_sample, p.grad = None, None, None  # the raw gradient is not needed any more
        self._carried = carried

    def clip_and_accumulate(self) -> None:
        samples = self.per_example_gradients()
        for p, sample in zip(self.params, samples):  # type: ignore[attr-defined]
            p.grad_sample = sample
        super().clip_and_accumulate()  # type: ignore[misc]
        for p, total in (getattr(self, "_carried", None) or {}).items():
            if p.summed_grad is not None and getattr(self, "_in_step", False):
                p.summed_grad += total

    def per_example_gradients(self) -> list[torch.Tensor]:
        """One fp32 ``[B, *p.shape]`` gradient per parameter, each example's views averaged, non-finite ones zero.

        At least fp32 norms and clip factors: under bf16 autocast they would let a clipped gradient exceed C (a
        float64 model keeps float64: rounding its gradients to fp32 moved its clipped sum by 1e-7).
        """
        params = self.params  # type: ignore[attr-defined]
        samples = []
        for p in params:
            sample = self._get_flat_grad_sample(p)  # type: ignore[attr-defined]
            sample = sample.to(torch.promote_types(sample.dtype, torch.float32))
            if self.views > 1:  # one example's K views: average their gradients, then clip as one example
                sample = sample.reshape(-1, self.views, *p.shape).mean(dim=1)
            samples.append(sample)
        # an example is dropped if any of its norms is not finite (NaN, inf, or an fp32 overflow of a huge gradient)
        norms = torch.stack([s.reshape(len(s), math.prod(p.shape)).norm(dim=1) for p, s in zip(params, samples)])
        dropped = ~norms.isfinite().all(dim=0)
        self.nonfinite_examples = self.nonfinite_examples + dropped.sum()
        for sample in samples:  # in place: no second copy of the per-example gradients
            sample.masked_fill_(dropped.view(-1, *([1] * (sample.ndim - 1))), 0.0)
        return samples

    def zero_for_unused_parameters(self) -> None:
        """A parameter the forward didn't use has no per-example gradient: give it zeros (safe: it adds nothing).

        One that has a gradient but no per-example gradient was used where the hooks can't see it (a layer that
        activation checkpointing re-runs in the backward pass): refused, as zeros would silently not train it.
        """
        params = self.params  # type: ignore[attr-defined]
        present = [p for p in params if getattr(p, "grad_sample", None) is not None]
        unseen = [p for p in params if getattr(p, "grad_sample", None) is None and _has_gradient(p)]
        if unseen:
            names = [self.parameter_names.get(id(p), f"a parameter of shape {tuple(p.shape)}") for p in unseen]
            raise RuntimeError(
                f"{names} got a gradient but no per-example gradient: they were used where Opacus's hooks can't "
                "see them (activation checkpointing, torch.utils.checkpoint, re-runs layers in the backward pass; "
                "or a functional use such as F.linear(x, layer.weight) of a layer never called), so DP-SGD would "
                "drop their gradients. Turn activation checkpointing off for DP training, and use parameters only "
                "through their modules."
            )
        rows = len(self._get_flat_grad_sample(present[0])) if present else 0  # type: ignore[attr-defined]
        for p in params:
            if getattr(p, "grad_sample", None) is None:
                p.grad_sample = p.new_zeros((rows, *p.shape))

    def discard(self) -> None:
        """Forget the clipped sums carried from earlier physical batches (the step is not taken)."""
        self._carried = {}

    def clear_per_example_state(self) -> None:
        for p in self.params:  # type: ignore[attr-defined]
            p.grad_sample, p.summed_grad = None, None

    def pre_step(self, closure: Any = None) -> Any:
        self.zero_for_unused_parameters()
        self._in_step = True
        try:
            return super().pre_step(closure)  # type: ignore[misc]
        finally:
            self._in_step = False
            self._carried = {}


def _summary(samples: Tensor, views: int) -> Tensor:
    """``[rows, *shape]`` per-row gradients -> ``[units, 2]``: each unit's (its ``views`` rows') norm and projection
    on a fixed unit direction, in fp32."""
    flat = samples.float().reshape(len(samples), -1)
    if views > 1 and len(flat) % views == 0:
        flat = flat.reshape(len(flat) // views, -1)
    direction = torch.cos(torch.arange(flat.shape[1], device=flat.device, dtype=flat.dtype) * 2.399963)
    return torch.stack([flat.norm(dim=1), flat @ (direction / direction.norm())], dim=1)


def _has_gradient(parameter: torch.Tensor) -> bool:
    """A non-zero ``.grad`` (Opacus zeroes gradients rather than dropping them); a sync, for parameters without
    per-example gradients only."""
    return parameter.grad is not None and bool(parameter.grad.any())


def _replayed_layers(module: nn.Module, every: bool) -> list[tuple[str, nn.Module]]:
    """The layers whose per-example gradients Opacus forms by re-running their forward pass under ``torch.func``
    (``vmap(grad)``): with ``every`` (``grad_sample_mode="functorch"``) every layer it hooks, else those with
    trainable parameters of their own and no per-sample rule (a ConvNeXt block's layer scale, Swin's relative-position
    bias table, ViT's class token), whose children Opacus then leaves alone. Opacus's own walk of the module."""
    found = []

    def walk(name: str, layer: nn.Module) -> None:
        own = any(p.requires_grad for p in layer.parameters(recurse=False))
        recurrent = isinstance(layer, DPRNN | DPLSTM | DPGRU)  # not hooked: its cells are
        ruled = recurrent or type(layer) in GradSampleModule.GRAD_SAMPLERS
        if own and not recurrent and (every or not ruled):
            found.append((name or "<root>", layer))
        if own and not ruled:
            return
        for child_name, child in layer.named_children():
            walk(f"{name}.{child_name}" if name else child_name, child)

    walk("", module)
    return found


def _refuse_what_torch_func_cannot_replay(layers: list[tuple[str, nn.Module]], mode: str) -> None:
    """Refuse, by name and before anything runs, ``layers`` (:func:`_replayed_layers`) that Opacus's re-run under
    ``torch.func`` can't replay: an ``EmbeddingBag`` (no ``torch.func`` support), a layer holding buffers (the re-run
    carries none) or drawing random numbers in training mode (dropout, stochastic depth). Unchecked, Opacus fails in
    the first backward pass with a bare ``NotImplementedError`` or torch's "vmap: called random operation".

    The fix differs with ``mode``: under ``"functorch"`` every layer is re-run, so ``"hooks"`` (per-layer rules) is
    the way out; under the other modes only layers without a rule are, so freezing or splitting them is.
    """
    bags = [(name, layer) for name, layer in layers if isinstance(layer, nn.EmbeddingBag)]
    buffered = [(name, layer) for name, layer in layers if next(layer.buffers(), None) is not None]
    random = [(name, layer, parts) for name, layer in layers if (parts := _random_parts(layer))]
    found = [
        f"{[_described(name, layer) for name, layer in refused]} {problem}"
        for refused, problem in (
            (bags, "are EmbeddingBags, which torch.func can't run"),
            (buffered, "hold buffers, which that recomputation can't carry"),
        )
        if refused
    ]
    found += [
        f"{_described(name, layer)} draws random numbers while training in {parts}" for name, layer, parts in random
    ]
    if not found:
        return
    if mode == "functorch":
        refused = list(
            dict.fromkeys(f"{name} ({type(layer).__name__})" for name, layer, *_ in (*bags, *buffered, *random))
        )
        raise RuntimeError(
            f"grad_sample_mode='functorch' can't form per-example gradients of layers {refused}: Opacus recomputes "
            f"every trainable layer's forward pass with torch.func there, and {'; '.join(found)} (dropout and "
            "stochastic depth can't be replayed there). Use grad_sample_mode='hooks', which forms them by per-layer "
            "rules (functorch only for a layer without one), or turn the random layers inside them off (p=0)."
        )
    raise RuntimeError(
        "DP-SGD can't form per-example gradients of layers that hold trainable parameters of their own and have no "
        f"per-sample rule: Opacus recomputes their whole forward pass with torch.func, and {'; '.join(found)} "
        "(dropout and stochastic depth can't be replayed there). Freeze those parameters (requires_grad_(False)), or "
        "move each into a small submodule of its own that holds no buffers and draws nothing (e.g. a bias table into "
        "an nn.Embedding looked up with the index buffer); or turn the random layers inside them off (p=0, e.g. "
        "stochastic_depth_prob=0)."
    )


def _refuse_what_ghost_norms_cannot_see(module: nn.Module, replayed: list[tuple[str, nn.Module]], mode: str) -> None:
    """Ghost clipping takes a layer's per-example norms from its rule and releases the gradient of the real backward
    pass, so every layer must compute exactly what its rule assumes. Refused by name, before the engine's own hooks
    are registered: the ``replayed`` layers (:func:`_replayed_layers`), whose norms would come from a ``torch.func``
    re-run (with Opacus's copy made at build, an attribute or dropout switched later: measured 34x ``max_grad_norm``;
    the check of each call's re-run, :mod:`~.replay`, compares outputs, not derivatives), and a trainable layer with
    a ``forward`` set on the instance or forward hooks or pre-hooks of the user's, which may use its weight again
    (measured: 2x)."""
    if replayed:
        described = [_described(name, layer) for name, layer in replayed]
        raise RuntimeError(
            f"grad_sample_mode={mode!r} can't clip layers {described}: they "
            "hold trainable parameters of their own and have no per-sample rule, so their per-example norms would "
            "come from Opacus re-running their forward pass with torch.func while the released gradient comes "
            "from the real backward pass; wherever the two differ (an attribute or training flag the re-run "
            "doesn't see), one example's contribution would not be bounded by max_grad_norm. Use "
            "grad_sample_mode='hooks' (its update is the clipped sum of the re-run gradients themselves), or "
            "freeze those parameters (requires_grad_(False))."
        )
    changed = [
        f"{name or '<root>'} ({type(layer).__name__})"
        for name, layer in trainable_modules(module)
        if "forward" in vars(layer) or layer._forward_hooks or layer._forward_pre_hooks
    ]
    if changed:
        raise RuntimeError(
            f"grad_sample_mode={mode!r} can't clip layers {changed}: each has a forward set on the instance or forward "
            "hooks of its own, so it may compute something else than the per-example rule of its type assumes, and "
            "ghost clipping would release that gradient unchecked. Use grad_sample_mode='hooks' or 'bk', or remove "
            "the hooks."
        )


def _refuse_parameters_the_rules_miss(module: nn.Module) -> None:
    """Opacus's per-sample rules for PyTorch's and its own layers form ``weight`` and ``bias`` only: a trainable
    parameter registered besides them (``fc.register_parameter("adapter", ...)``, used by a hook or by the parent)
    never gets a per-example gradient, and Opacus failed in the backward pass with "'Parameter' object has no
    attribute '_current_grad_sample'". Refused by name before anything runs (a user's own rule for a class of theirs
    may form any parameter: not checked)."""
    extra = [
        f"{name}.{parameter_name}"
        for name, layer in trainable_modules(module)
        if (formed := opacus_formed_parameters(layer)) is not None
        for parameter_name, parameter in layer.named_parameters(recurse=False)
        if parameter.requires_grad and parameter_name not in formed
    ]
    if extra:
        raise RuntimeError(
            f"Parameters {extra} are registered on layers whose per-sample rule forms only their weight and bias, so "
            "they would get no per-example gradient. Move each into a module of its own (e.g. an nn.Module holding "
            "the adapter, called on the layer's output), or freeze it (requires_grad_(False))."
        )


def _described(name: str, layer: nn.Module) -> str:
    """``name (Type: [own trainable parameters])``."""
    own = [n for n, p in layer.named_parameters(recurse=False) if p.requires_grad]
    return f"{name} ({type(layer).__name__}: {own})"


_RANDOM_LAYERS = ("Dropout", "StochasticDepth", "DropPath")
"""Class names (and their bases') of layers that draw random numbers in training mode with a probability ``p`` (or
``drop_prob``) > 0: ``nn.Dropout*``, torchvision's ``StochasticDepth``, timm's ``DropPath``."""


def _random_parts(layer: nn.Module) -> list[str]:
    """The modules inside ``layer`` (itself included) that draw random numbers in training mode."""
    return [
        name or "<itself>"
        for name, part in layer.named_modules()
        if part.training
        and any(kind in cls.__name__ for cls in type(part).__mro__ for kind in _RANDOM_LAYERS)
        and float(getattr(part, "p", getattr(part, "drop_prob", 0.0)) or 0.0) > 0
    ]


class _CarryingDPOptimizer(_CarryClippedSums, DPOptimizer):
    pass


class _CarryingDistributedDPOptimizer(AgreedReduction, _CarryClippedSums, DistributedDPOptimizer):
    pass


class _RowsSeen:
    """(layer, rows of its input) of every call of a trainable layer while watched, since the last check; and, for
    a layer that Opacus re-runs under ``torch.func`` (:func:`_replayed_layers`), a refusal of a call with other inputs
    that matter (:meth:`check_replayed_inputs`).

    The layers' hooks hold this small record, not the engine: a copy of the module (``copy.deepcopy``, as some
    measurements make) must not copy the engine and its DP optimizer (copying an Opacus optimizer also patches its
    class's ``step`` for every later instance).
    """

    def __init__(self, once: bool = False, refuse: Refuse = raise_refusal) -> None:
        self.seen: list[tuple[str, int]] = []
        self.watching, self.refuse = False, refuse  # refuse: see lightning_nt.privacy.agreement.Refuse
        self.once = once  # a layer called twice in one step is refused (ghost clipping can't clip it)

    def note(self, name: str, layer: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self.watching and torch.is_grad_enabled() and not replaying():
            if not inputs or not isinstance(inputs[0], Tensor):
                self.refuse(positional_input_refusal(name, type(layer).__name__))
                return
            if self.once and any(seen == name for seen, _ in self.seen):
                refusal = RuntimeError(
                    f"Layer {name!r} ran twice in one training step (a block shared between depths or positions, or "
                    "a layer also run on other inputs): grad_sample_mode='ghost' computes a layer's per-example "
                    "gradient norms from one call, and can't clip a parameter used twice (Opacus calls it parameter "
                    "tying). Refused before any noise. Use grad_sample_mode='hooks' or 'bk', which sum a shared "
                    "layer's per-example gradients over its calls."
                )
                self.refuse(refusal)
                return
            self.seen.append((name, inputs[0].shape[0] if inputs[0].ndim else 0))

    def check_replayed_inputs(
        self, name: str, signature: inspect.Signature, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Refuse a call of a replayed layer, before it runs, with inputs besides its first positional tensor that
        differ from their defaults: Opacus re-runs the layer on that first input alone (``layer(x, None)`` is
        replayed exactly as ``layer(x)``; ``layer(x, mask)`` or ``layer(x, scale=s)`` would not be)."""
        if self.watching and torch.is_grad_enabled() and not replaying():
            others = _inputs_besides_the_first(signature, args, kwargs)
            if others:
                refusal = RuntimeError(
                    f"Layer {name!r} ({type(layer).__name__}) was called with inputs {others} that Opacus can't "
                    "replay: it forms the layer's per-example gradients by re-running its forward pass with "
                    "torch.func on its first positional input alone, a tensor (every layer's under "
                    "grad_sample_mode='functorch'; under the other modes a layer with trainable parameters of its "
                    "own and no per-sample rule), so they would be the gradients of another computation. Refused "
                    "before any noise. Call the layer on one tensor and compute its other inputs inside it, or move "
                    "its trainable parameters into submodules called on one input (nn.Linear, nn.Embedding, ...), or "
                    "freeze them (requires_grad_(False))."
                )
                self.refuse(refusal)


def _inputs_besides_the_first(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    """The names of a call's arguments other than its first positional tensor whose values are not their defaults
    (every argument's name when the call has no tensor first; none when the call doesn't bind: it fails itself)."""
    try:
        arguments = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return []
    if not args or not isinstance(args[0], Tensor):
        return list(arguments)
    (first, values), *others = arguments.items()
    spread = signature.parameters[first].kind is inspect.Parameter.VAR_POSITIONAL and len(values) > 1  # forward(*x)
    return [first] * spread + [name for name, value in others if not _at_default(signature.parameters[name], value)]


def _takes_one_input(signature: inspect.Signature) -> bool:
    """Whether a ``forward`` takes one input at most (``forward(self, x)``, as ``nn.Linear``'s)."""
    kinds = [p.kind for p in signature.parameters.values()]
    return len(kinds) <= 1 and all(
        kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for kind in kinds
    )


def _at_default(parameter: inspect.Parameter, value: Any) -> bool:
    """Whether ``value`` is ``parameter``'s default (the same object, or an equal number, string or flag)."""
    if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return not value
    default = parameter.default
    plain = isinstance(value, bool | int | float | str) and type(value) is type(default)
    return value is default or (plain and value == default)


class _FirstInputOnly:
    """Opacus's hooks, keeping a layer's first positional input only: every per-sample rule, and the ``torch.func``
    re-run of a layer without one, reads that one alone. Opacus kept them all: it detached each (``bag(tokens, None)``
    failed with an AttributeError on the ``None``) and took the rows of the mean reduction from the last one. A
    re-run layer's call also records its output, which the re-run must reproduce (:mod:`~.replay`)."""

    def capture_activations_hook(self, module: nn.Module, forward_input: tuple[Any, ...], output: Any) -> None:
        if replaying():  # a module reached by a re-run outside its snapshot: its own calls are recorded already
            return
        recorded = len(vars(module).get("activations", ()))
        super().capture_activations_hook(module, forward_input[:1], output)  # type: ignore[misc]
        if "ft_compute_sample_grad" in vars(module):  # a re-run layer: its snapshot and output go with its input
            record_call(module, output, len(vars(module).get("activations", ())) > recorded)

    def capture_backprops_hook(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        if replaying():
            return
        if self.hooks_enabled and vars(module).get("activations") == []:  # type: ignore[attr-defined]
            name = next((n for n, m in self._module.named_modules() if m is module), "")  # type: ignore[attr-defined]
            raise second_backward_refusal(name, type(module).__name__)  # a second backward (Opacus: an IndexError)
        super().capture_backprops_hook(module, *args, **kwargs)  # type: ignore[misc]


class _Hooks(_FirstInputOnly, GradSampleHooks):
    pass


class _GhostHooks(_FirstInputOnly, GradSampleHooksFastGradientClipping):
    pass


class OpacusHooksEngine(ClippingEngine):
    """Opacus's per-sample-gradient hooks; the only engine that hands out per-example gradients (for the probe).

    Opacus takes dimension 0 of every layer's input as the examples. A layer that sees other rows (a forward that
    folds tokens into the batch, ``x.reshape(-1, d)``, a sequence-first layer, a second call on a few fixed inputs)
    would be clipped row by row, not example by example, and one example could move the update by far more than
    ``max_grad_norm``; so every trainable layer's rows are checked against the batch's before the step's noise.
    Fewer rows pass that check (a ``training_step`` may drop examples), and so does a sequence-first layer with at
    most as many positions as examples: the example-independence check (:mod:`~lightning_nt.privacy.independence`)
    finds those.
    """

    supports_sensitivity_probe = True
    hooks_class: type[GradSampleHooks] = _Hooks
    calls_each_layer_once = False  # a layer may run several times in a step (its per-example gradients add up)
    releases_replayed_gradients = True  # the update is the clipped sum of the re-run layers' per-example gradients
    optimizers = (_CarryingDPOptimizer, _CarryingDistributedDPOptimizer)

    def __init__(self, mode: str, module: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        replayed = _replayed_layers(module, every=mode == "functorch")
        if not self.releases_replayed_gradients:
            _refuse_what_ghost_norms_cannot_see(module, replayed, mode)
        _refuse_what_torch_func_cannot_replay(replayed, mode)
        _refuse_parameters_the_rules_miss(module)
        self._replayed = replayed
        super().__init__(mode, module, optimizer, **options)
        self.optimizer.parameter_names = self.parameter_names
        with without_opacus_copies():  # each re-run layer's re-run is set below
            self.hooks = self.hooks_class(module, force_functorch=mode == "functorch", **self._hook_options(options))
        self.hooks.disable_hooks()  # on only from a training step to its optimizer step
        self._rows = _RowsSeen(once=self.calls_each_layer_once, refuse=self.route)
        self._row_watches = [  # before Opacus's own hooks, which refuse a second call less clearly
            layer.register_forward_hook(partial(self._rows.note, name), prepend=True)
            for name, layer in trainable_modules(module)
            if not aliases_only(layer)  # its submodules see the rows (DPLSTM over time steps)
        ]
        snapshot = snapshot_at_call(lambda: self._rows.watching)
        for name, layer in replayed:
            layer.ft_compute_sample_grad = CheckedReplay(name, layer)  # re-runs each call's snapshot, checked
            if type(layer) not in GradSampleModule.GRAD_SAMPLERS:  # a forward that may change the layer's state
                self._row_watches.append(layer.register_forward_pre_hook(snapshot))  # after the user's pre-hooks
            signature = inspect.signature(layer.forward)
            if not _takes_one_input(signature):  # forward(self, x) (nn.Linear's): nothing else to check
                check = partial(self._rows.check_replayed_inputs, name, signature)  # every step: inputs may vary
                self._row_watches.append(layer.register_forward_pre_hook(check, with_kwargs=True, prepend=True))

    def _hook_options(self, options: dict[str, Any]) -> dict[str, Any]:
        return {"loss_reduction": "mean"}

    def _start(self) -> None:
        # a dropout switched on since the engine was built (in eval mode) draws in the re-run of each call, which
        # torch.func can't replay: refused, by name, before the forward pass rather than in the backward pass
        drawing = [(name, layer) for name, layer in self._replayed if _random_parts(layer)]
        if drawing:
            _refuse_what_torch_func_cannot_replay(drawing, self.mode)
        # Opacus's hooks read `p.grad_sample`, which Opacus sets once when attaching, `forget` removes after every
        # step and the DP optimizer puts back only for its own parameters: put the empty slot back on every one.
        for _, p in trainable_parameters(self.module):
            if "grad_sample" not in vars(p):
                p.grad_sample = None
        self.hooks.enable_hooks()
        self._rows.watching = True

    def _stop(self) -> None:
        self.hooks.disable_hooks()
        self._rows.watching = False

    def _close(self) -> None:
        self.hooks.cleanup()
        for watch in self._row_watches:
            watch.remove()
        self._row_watches = []

    def backward(self, loss: torch.Tensor, ordinary: Callable[[], torch.Tensor], rows: int, precision: Any) -> Any:
        self._check_rows(rows)
        return ordinary()  # the hooks fill grad_sample; the optimizer clips and sums in its step

    def carry(self, rows: int) -> None:
        self._check_rows(rows)
        self.optimizer.carry_clipped_sums()

    def example_quantities(self, output: Any, rows: int) -> dict[str, torch.Tensor]:
        """Each unit's gradient of every parameter, summarised by its norm and its projection on a fixed direction
        (two numbers: a change of the gradient that keeps both is a coincidence of measure zero)."""
        loss_from_output(output, "training_step").backward()
        self._check_rows(rows)
        found = {}
        for name, p in trainable_parameters(self.module):
            if getattr(p, "grad_sample", None) is not None:
                found[name] = _summary(self.optimizer._get_flat_grad_sample(p), self.optimizer.views)
            p.grad_sample = None
        return found

    def discard_per_example_state(self) -> None:
        self.optimizer.clear_per_example_state()
        self._rows.seen = []

    def _check_rows(self, rows: int) -> int | None:
        """Refuse the step (before any noise) unless every trainable layer's every call saw the same rows, at most
        the ``rows`` of the batch (a ``training_step`` may leave examples out); return those rows (None: no call).

        Opacus takes each row as one example: more rows than examples (positions folded into dimension 0, an
        example repeated) clip parts of an example separately, and a layer that also runs on other inputs (a few
        fixed prototypes) has their gradient added to its first examples'.
        """
        seen, self._rows.seen = self._rows.seen, []
        counts = sorted({n for _, n in seen})
        if not counts or (len(counts) == 1 and counts[0] <= rows):
            return counts[0] if counts else None
        by_layer: dict[str, list[int]] = {}
        for name, n in seen:
            by_layer.setdefault(name or type(self.module).__name__, []).append(n)
        described = "; ".join(f"{name}: {' and '.join(map(str, calls))}" for name, calls in by_layer.items())
        shared = [name for name, calls in by_layer.items() if set(calls) == {1}]
        raise RuntimeError(
            f"The trainable layers saw these rows in dimension 0 of their inputs ({described}) where the batch has "
            f"{rows} examples: Opacus clips each row as one example, so one example could move the update by more "
            "than max_grad_norm. Keep the examples in dimension 0 of every trainable layer's input, one row each "
            "(no x.reshape(-1, d) folding positions into the batch, batch_first=True, augmented views through "
            "augmentation_multiplicity), and run the trainable layers on the batch only."
            + (shared_input_advice(shared) if shared and rows > 1 else "")
        )

    def last_norms(self) -> torch.Tensor | None:
        if any(getattr(p, "grad_sample", None) is None for p in self.optimizer.params):  # forgotten, or no step yet
            return None
        samples = self.optimizer.grad_samples
        if not samples or not len(samples[0]):  # no example in this batch
            return None
        return torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples], dim=1).norm(dim=1)

    def _forget_own_state(self) -> None:
        if hasattr(self.hooks, "_per_sample_gradient_norms"):
            self.hooks._per_sample_gradient_norms = None
        self.optimizer.discard()
        self._rows.seen = []
