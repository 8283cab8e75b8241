"""Which trainable parameters a training step uses outside the calls of their own layers (a DP-SGD guard).

Every clipping engine forms each example's gradient from the calls of the layers that own the parameters (Opacus's
hooks, book-keeping's records). A parameter used elsewhere (``F.linear(x, self.fc.weight)`` for a tied output layer,
``layer.forward(x)``, a penalty on the weights in ``training_step``) has a part of its gradient that no hook sees:
Opacus's hooks and book-keeping leave it out of the update (the model silently trains on less than its gradient),
and ghost clipping's second backward pass carries it into the update unclipped. :class:`ParameterUses` finds such
uses in one forward pass (a ``TorchFunctionMode``), keeping those the loss depends on. The strategy refuses them
under ghost clipping (every step) and warns about them under Opacus's hooks (a fit's first step); book-keeping's
parameters do not require grad while it records, so such a use leaves no trace there and is not seen.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from opacus.utils.module_utils import trainable_modules
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["ParameterUses"]


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

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        layers = list(trainable_modules(module))
        self.names = {
            id(p): f"{prefix}.{name}" if prefix else name
            for prefix, layer in layers
            for name, p in layer.named_parameters(recurse=False)
            if p.requires_grad
        }
        self.running: Counter[int] = Counter()  # parameters whose layer is being called
        self.in_hooks = 0  # Opacus's own forward hooks are running (they may prepare a layer from its parameters)
        self.outside: list[tuple[str, Any]] = []  # (parameter, the node of the operation that used it)
        self.handles = [
            handle
            for _, layer in layers
            for handle in (
                layer.register_forward_pre_hook(self._enter),
                layer.register_forward_hook(self._leave, prepend=True),
                layer.register_forward_hook(self._after_hooks),
            )
        ]
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
        result = func(*args, **kwargs)
        node = _graph_node(result) if torch.is_grad_enabled() and not self.in_hooks else None
        if node is not None:
            for value in (*args, *kwargs.values()):
                for tensor in value if isinstance(value, list | tuple) else (value,):
                    if isinstance(tensor, nn.Parameter) and id(tensor) in self.names and self.running[id(tensor)] <= 0:
                        self.outside.append((self.names[id(tensor)], node))
        return result

    def begin(self) -> None:
        """Start watching a training step's forward pass."""
        if not self.active:
            self.running.clear()
            self.in_hooks, self.outside = 0, []
            self.__enter__()
            self.active = True

    def end(self, loss: torch.Tensor | None = None) -> list[str]:
        """Stop watching; the parameters used outside their layer's call by an operation that ``loss`` depends on
        (logging a weight's norm is not such a use), each named once."""
        if self.active:
            self.__exit__(None, None, None)
            self.active = False
        outside, self.outside = self.outside, []
        if loss is None or not outside:
            return []
        reached = _reachable([loss.grad_fn])
        return list(dict.fromkeys(name for name, node in outside if node in reached))

    def close(self) -> None:
        self.end()
        for handle in self.handles:
            handle.remove()
