"""Which trainable parameters a training step uses outside the calls of their own layers (a DP-SGD guard).

Every clipping engine forms each example's gradient from the calls of the layers that own the parameters (Opacus's
hooks, book-keeping's records). A parameter used elsewhere (``F.linear(x, self.fc.weight)`` for a tied output layer,
``layer.forward(x)``, a penalty on the weights in ``training_step``) has a part of its gradient that no hook sees:
Opacus's hooks and book-keeping leave it out of the update (the model silently trains on less than its gradient),
and ghost clipping's second backward pass carries it into the update unclipped. :class:`ParameterUses` finds such
uses in one forward pass (a ``TorchFunctionMode``), keeping those the loss depends on. The strategy refuses them
under every engine: under ghost clipping on every step, under the others on a fit's first step. ``trainable``
names the parameters to watch (book-keeping's do not require grad while it records, so ``requires_grad`` can't).

:class:`WeightedBagGuard` refuses an ``nn.EmbeddingBag`` of a trainable table called with ``per_sample_weights`` on
every step, whatever the engine: a model may pass the weights only on some batches, which a first-step check misses.
It is the one check of ``per_sample_weights``: a custom layer calling ``F.embedding_bag`` on its own table has no
per-sample rule, so Opacus re-runs its whole forward pass under ``torch.func``, weights included (exact); a call
that passes the weights in as an input, which that re-run would not see, is refused on every step
(:class:`~lightning_nt.privacy.engines.hooks.OpacusHooksEngine`'s replayed-input check); book-keeping refuses such a
layer outright (no rule); outside any layer's call, ``F.embedding_bag`` on a table is a use :class:`ParameterUses`
refuses like any other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from lightning_nt.privacy.agreement import Refuse, raise_refusal

__all__ = ["ParameterUses", "WeightedBagGuard"]


def _graph_node(result: Any) -> Any:
    """The autograd node that an operation's result hangs from (None for a shape, a detached copy, or the parameter
    itself, which in-place operations and ``requires_grad_`` return)."""
    results = result if isinstance(result, list | tuple) else (result,)
    return next((r.grad_fn for r in results if isinstance(r, torch.Tensor) and r.grad_fn is not None), None)


def _reachable(roots: list[Any]) -> set[Any]:
    """Every autograd node the backward pass from ``roots`` goes through."""
    seen: set[Any] = set()
    stack = [root for root in roots if root is not None]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(parent for parent, _ in node.next_functions if parent is not None)
    return seen


def _traced(values: Any, used: list[nn.Parameter]) -> Any:
    """``values`` with each frozen parameter of ``used`` replaced by an alias that requires grad (the same storage):
    book-keeping records with its parameters frozen, so a use of one would leave no trace in the autograd graph."""
    frozen = {id(p) for p in used if not p.requires_grad}

    def alias(value: Any) -> Any:
        return value.detach().requires_grad_() if id(value) in frozen else value

    if isinstance(values, dict):
        return {key: alias(value) for key, value in values.items()}
    return tuple(type(item)(map(alias, item)) if isinstance(item, list | tuple) else alias(item) for item in values)


class ParameterUses(TorchFunctionMode):
    """While entered: notes every trainable parameter that a torch operation uses, with grad enabled, outside a call
    of its own layer (``F.linear(x, self.fc.weight)``, ``self.fc.forward(x)``, a penalty on the weights, a parameter
    of the LightningModule itself used in ``training_step``), where the clipping engines' layer hooks can't see it.

    Example::

        uses = ParameterUses(module)
        uses.begin()
        loss = module.training_step(batch, 0)
        uses.end(loss)  # ['fc.weight'] if the loss depends on such a use of fc.weight
    """

    def __init__(self, module: nn.Module, trainable: Collection[int] | None = None) -> None:
        super().__init__()
        trainable = {id(p) for p in module.parameters() if p.requires_grad} if trainable is None else trainable
        self.layers = [
            layer for layer in module.modules() if any(id(p) in trainable for p in layer.parameters(recurse=False))
        ]
        self.names = {
            id(p): f"{prefix}.{name}" if prefix else name
            for prefix, layer in module.named_modules()
            for name, p in layer.named_parameters(recurse=False)
            if id(p) in trainable
        }
        self.running: Counter[int] = Counter()  # parameters whose layer is being called
        self.in_hooks = 0  # Opacus's own forward hooks are running (they may prepare a layer from its parameters)
        self.outside: list[tuple[str, Any]] = []  # (parameter, the node of the operation that used it)
        self.handles: list[Any] = []  # the layers' hooks, only while watching
        self.active = False

    def _enter(self, layer: nn.Module, inputs: Any) -> None:
        self.running.update(id(p) for p in layer.parameters(recurse=False))

    def _leave(self, layer: nn.Module, inputs: Any, output: Any) -> None:
        self.running.subtract(id(p) for p in layer.parameters(recurse=False))
        self.in_hooks += 1

    def _after_hooks(self, layer: nn.Module, inputs: Any, output: Any) -> None:
        self.in_hooks -= 1

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        used = self._used_outside(args, kwargs) if torch.is_grad_enabled() and not self.in_hooks else []
        if any(not p.requires_grad for p in used) and not getattr(func, "__name__", "").endswith("_"):
            args, kwargs = _traced(args, used), _traced(kwargs, used)
        result = func(*args, **kwargs)
        node = _graph_node(result) if used else None
        if node is not None:
            self.outside.extend((self.names[id(p)], node) for p in used)
        return result

    def _used_outside(self, args: Any, kwargs: dict[str, Any]) -> list[nn.Parameter]:
        """The watched parameters among an operation's arguments whose layer is not being called."""
        return [
            tensor
            for value in (*args, *kwargs.values())
            for tensor in (value if isinstance(value, list | tuple) else (value,))
            if isinstance(tensor, nn.Parameter) and id(tensor) in self.names and self.running[id(tensor)] <= 0
        ]

    def begin(self) -> None:
        """Start watching a training step's forward pass."""
        if not self.active:
            self.running.clear()
            self.in_hooks, self.outside = 0, []
            self.handles = [
                handle
                for layer in self.layers
                for handle in (
                    layer.register_forward_pre_hook(self._enter),
                    layer.register_forward_hook(self._leave, prepend=True),
                    layer.register_forward_hook(self._after_hooks),  # after the engine's own hooks
                )
            ]
            self.__enter__()
            self.active = True

    def end(self, loss: torch.Tensor | None = None) -> list[str]:
        """Stop watching; the parameters used outside their layer's call by an operation that ``loss`` depends on
        (logging a weight's norm is not such a use), each named once."""
        if self.active:
            self.__exit__(None, None, None)
            for handle in self.handles:
                handle.remove()
            self.handles, self.active = [], False
        outside, self.outside = self.outside, []
        if loss is None or not outside:
            return []
        reached = _reachable([loss.grad_fn])
        return list(dict.fromkeys(name for name, node in outside if node in reached))


class WeightedBagGuard:
    """While :attr:`watching`: refuses a call of an ``nn.EmbeddingBag`` whose table is in ``trainable`` with
    ``per_sample_weights`` (positional or keyword), before the call runs, with grad enabled (``refuse``: raised by
    default, see :data:`~lightning_nt.privacy.agreement.Refuse`).

    No engine's per-example rule sees the weights: Opacus's hooks record a layer's first input only, so under hooks and
    book-keeping every example's gradient is formed, and clipped, without them (the update stays bounded by the clip
    but is not the gradient); ghost clipping's second pass carries the weighted gradient, whose norm it never
    measured. A forward pre-hook on each such bag, for the engine's lifetime: a model may pass the weights only on
    some batches, so the check runs on every step; a model without a trainable ``EmbeddingBag`` gets no hook.

    Example::

        guard = WeightedBagGuard(module, {id(p) for p in module.parameters() if p.requires_grad})
        guard.watching = True   # a training step
        module.bag(tokens, per_sample_weights=weights)  # RuntimeError naming bag.weight
        guard.remove()
    """

    def __init__(self, module: nn.Module, trainable: Collection[int], refuse: Refuse = raise_refusal) -> None:
        self.watching, self.refuse = False, refuse
        self.handles = [
            bag.register_forward_pre_hook(partial(self._check, f"{name}.weight".lstrip(".")), with_kwargs=True)
            for name, bag in module.named_modules()
            if isinstance(bag, nn.EmbeddingBag) and id(bag.weight) in trainable
        ]

    def _check(self, name: str, bag: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.watching and torch.is_grad_enabled():
            weights = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
            if weights is not None:
                refusal = RuntimeError(
                    f"{name} is pooled by an EmbeddingBag with per_sample_weights, which no clipping engine's "
                    "per-example gradient rule takes into account: each example's gradient would be formed without "
                    "the weights (ghost clipping would then release a weighted gradient whose norm it never bounded; "
                    "the other engines would train on what is not the gradient). Refused before any noise. Weight "
                    "the looked-up vectors yourself (an nn.Embedding, then a weighted sum over positions), or freeze "
                    "the table."
                )
                self.refuse(refusal)

    def remove(self) -> None:
        """Take the hooks off the module (the end of a fit)."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.watching = [], False
