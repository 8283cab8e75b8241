"""Modules compiled with ``torch.compile``: measurements run the eager code, names are given without ``_orig_mod.``.

Users compile in two ways: ``trainer.fit(torch.compile(module))`` (Lightning unwraps the ``OptimizedModule`` and
compiles the LightningModule's ``forward`` and ``*_step`` methods in place), or a submodule compiled inside the
LightningModule (``self.backbone = torch.compile(backbone)``), whose parameters and submodules are then named with
an ``_orig_mod.`` component (``backbone._orig_mod.0.weight``). Compiled code is for training speed; a measurement
can't always run on it: AOTAutograd's backward has no double backward (Hessian-vector products, GradInit's search),
and a forward hook registered on a layer inside a compiled graph does not fire. :func:`eager_execution` runs every
compiled function's original Python code instead, on the same parameters, without touching the user's model or the
compiled code that training goes on using (its caches stay as they were). :func:`preserved_state` and
:func:`~lightning_nt.common.autodiff.differentiable_kernels`, which every measurement runs in, enter it.

Names: what a capability logs and keys by name (GradInit's scales, similarity layers) drops the ``_orig_mod.``
components, so that a compiled run and an uncompiled one log the same tags; a layer name given by a user is
accepted with or without them. (State dicts keep PyTorch's own names: they must load into the module;
:func:`renamed_state_dict` renames one saved from a module compiled the other way.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch._dynamo import OptimizedModule

__all__ = [
    "COMPILED_COMPONENT",
    "compiled_parts",
    "eager_execution",
    "named_modules",
    "renamed_state_dict",
    "uncompiled_name",
    "with_own_methods",
]

COMPILED_COMPONENT = "_orig_mod"
"""The attribute of ``torch.compile``'s ``OptimizedModule`` that holds the original module (and names it)."""


@contextmanager
def eager_execution() -> Iterator[None]:
    """Code compiled with ``torch.compile`` runs as its original eager Python inside the block.

    Nothing is recompiled or un-compiled: outside the block the same compiled code runs again. Nests freely; a
    block entered from inside compiled code (where the stance can't change) leaves it as it is.

    Examples:
        >>> net = torch.compile(nn.Linear(2, 1), backend="eager")
        >>> with eager_execution():
        ...     net(torch.ones(1, 2)).shape
        torch.Size([1, 1])
    """
    if torch.compiler.is_compiling():
        yield
        return
    with torch.compiler.set_stance("force_eager"):
        yield


def with_own_methods(copy: nn.Module) -> nn.Module:
    """``copy`` (a deep copy of a module) running its own methods: those Lightning compiled in place are dropped.

    ``trainer.fit(torch.compile(module))`` sets ``module.forward`` (and the ``*_step`` methods) to compiled wrappers
    of the module's bound methods; a deep copy keeps those wrappers, which call the *original* module, so a
    measurement on the copy (squared weights, decoded weights) would silently compute with the original's. Only
    the copy changes; the user's module stays compiled.

    Examples:
        >>> import copy
        >>> from pytorch_lightning.demos.boring_classes import BoringModel
        >>> from pytorch_lightning.utilities.compile import from_compiled
        >>> module = from_compiled(torch.compile(BoringModel(), backend="eager"))
        >>> twin = with_own_methods(copy.deepcopy(module))
        >>> "forward" in vars(twin), "forward" in vars(module)
        (False, True)
    """
    context = getattr(copy, "_compiler_ctx", None)
    if context is not None:
        for key in context:
            if key.startswith("original_"):  # "original_forward": the eager method that "forward" wraps
                copy.__dict__.pop(key.removeprefix("original_"), None)
        copy._compiler_ctx = None
    return copy


def uncompiled_name(name: str) -> str:
    """``name`` (of a parameter, buffer or submodule) without the ``_orig_mod`` components of compiled modules.

    Examples:
        >>> uncompiled_name("backbone._orig_mod.0.weight"), uncompiled_name("_orig_mod"), uncompiled_name("net.1")
        ('backbone.0.weight', '', 'net.1')
    """
    return ".".join(part for part in name.split(".") if part != COMPILED_COMPONENT)


def renamed_state_dict(module: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` (a state dict) with each key renamed to ``module``'s own name of the same :func:`uncompiled_name`.

    A state dict saved from a network whose submodule was compiled (``net._orig_mod.0.weight``) then loads into the
    same architecture uncompiled (``net.0.weight``), and the other way round; a key ``module`` has no match for is
    kept, so that ``load_state_dict`` names it.

    Examples:
        >>> compiled = nn.Sequential(torch.compile(nn.Linear(2, 1)))
        >>> sorted(renamed_state_dict(compiled, nn.Sequential(nn.Linear(2, 1)).state_dict()))
        ['0._orig_mod.bias', '0._orig_mod.weight']
    """
    own = {uncompiled_name(name): name for name in module.state_dict(keep_vars=True)}
    return {own.get(uncompiled_name(key), key): value for key, value in state.items()}


def named_modules(module: nn.Module) -> dict[str, nn.Module]:
    """``module``'s submodules by :func:`uncompiled_name`, each compiled one as its original module (the
    ``OptimizedModule`` wrapper itself left out): the modules that run, and their hooks fire, under
    :func:`eager_execution`.

    Examples:
        >>> net = nn.Sequential(torch.compile(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
        >>> sorted(named_modules(net))
        ['', '0', '0.0', '0.1']
        >>> type(named_modules(net)["0"]).__name__
        'Sequential'
    """
    return {
        uncompiled_name(name): child for name, child in module.named_modules() if not isinstance(child, OptimizedModule)
    }


def compiled_parts(module: nn.Module) -> list[str]:
    """What of ``module`` is compiled: ``"forward"`` when its own methods were compiled in place (Lightning's
    ``trainer.fit(torch.compile(module))``), and the :func:`uncompiled_name` of every compiled submodule (wrapped by
    ``torch.compile(submodule)`` or compiled in place by ``submodule.compile()``).

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), torch.compile(nn.ReLU()), nn.Tanh())
        >>> net[2].compile()
        >>> compiled_parts(net)
        ['1', '2']
        >>> compiled_parts(nn.Linear(2, 2))
        []
    """
    parts = ["forward"] if getattr(module, "_compiler_ctx", None) is not None else []
    return parts + [
        uncompiled_name(name) or "<root>"
        for name, child in module.named_modules()
        if isinstance(child, OptimizedModule) or getattr(child, "_compiled_call_impl", None) is not None
    ]
