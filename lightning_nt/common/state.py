"""Snapshot and exact restore of everything a measurement could disturb.

A callback that runs extra forward/backward passes (Hessian-vector products, look-ahead steps)
must leave the run as it found it: parameter values, ``.grad``, buffers such as BatchNorm running
statistics, the random number generators and every module's ``training`` flag. Wrap the work in
:func:`preserved_state` and all of them are restored bitwise when the block ends, also on error. Inside it, code
compiled with ``torch.compile`` runs eagerly (:func:`~lightning_nt.common.compiled.eager_execution`): a measurement
differentiates twice and hooks layers, which compiled code can't do, and training goes on with its compiled code.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_nt.common.compiled import eager_execution

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = [
    "RNGState",
    "continues_earlier_fit",
    "continues_run",
    "preserved_modes",
    "preserved_rng",
    "preserved_state",
    "stable_name",
]


@dataclass
class RNGState:
    """The state of Python's, NumPy's and torch's (CPU and every initialised CUDA device) generators."""

    python: Any = field(default_factory=random.getstate)
    numpy: Any = field(default_factory=np.random.get_state)
    torch_cpu: Tensor = field(default_factory=torch.get_rng_state)
    torch_cuda: list[Tensor] = field(
        default_factory=lambda: torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    )

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda:
            torch.cuda.set_rng_state_all(self.torch_cuda)


@contextmanager
def preserved_rng(*generators: torch.Generator) -> Iterator[None]:
    """Restore the global generators, and any extra ``torch.Generator`` given, when the block ends."""
    state = RNGState()
    extra = [(generator, generator.get_state()) for generator in generators]
    try:
        yield
    finally:
        state.restore()
        for generator, generator_state in extra:
            generator.set_state(generator_state)


@contextmanager
def preserved_state(
    module: nn.Module,
    *,
    parameters: bool = True,
    buffers: bool = True,
    grads: bool = True,
    rng: bool = True,
    modes: bool = True,
) -> Iterator[None]:
    """Restore ``module``'s parameters, buffers, ``.grad``, the RNGs and ``training`` flags when the block ends;
    run compiled code eagerly inside it.

    Values are copied back in place, by name, so parameter objects keep their identity and the optimizer keeps
    pointing at them. A parameter or buffer registered inside the block (a layer that creates its state from the
    first batch it sees) is removed again, so that the run registers it from its own batch as it would have without
    the block. Each flag can be turned off to save the copy when the block can't change that part.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> before = net[1].running_mean.clone()
        >>> with preserved_state(net):
        ...     _ = net.train()(torch.randn(8, 2))
        ...     net[0].register_buffer("center", torch.zeros(2))
        >>> torch.equal(net[1].running_mean, before), hasattr(net[0], "center")
        (True, False)
    """
    registered = _state_names(module)
    saved_parameters = _clone_named(module.named_parameters()) if parameters else None
    saved_buffers = _clone_named(module.named_buffers()) if buffers else None
    saved_grads = [(p, p.grad, _clone_or_none(p.grad)) for p in module.parameters()] if grads else None
    saved_modes = [(m, m.training) for m in module.modules()] if modes else None
    saved_rng = RNGState() if rng else None
    try:
        with eager_execution():
            yield
    finally:
        _remove_registered_since(module, registered)
        with torch.no_grad():
            if saved_parameters is not None:
                _copy_back(module.named_parameters(), saved_parameters)
            if saved_buffers is not None:
                _copy_back(module.named_buffers(), saved_buffers)
        if saved_grads is not None:
            for p, grad, value in saved_grads:
                if grad is not None:
                    grad.copy_(value)
                p.grad = grad
        if saved_modes is not None:
            for submodule, training in saved_modes:
                submodule.training = training
        if saved_rng is not None:
            saved_rng.restore()


def preserved_modes(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Restore every submodule's ``training`` flag (and nothing else) when the block ends."""
    return preserved_state(module, parameters=False, buffers=False, grads=False, rng=False)


def stable_name(function: Callable[..., Any] | None) -> str | None:
    """A name for ``function`` that is the same in every process (no memory address): for a callback's state key.

    Examples:
        >>> stable_name(len), stable_name(None)
        ('builtins.len', None)
    """
    if function is None:
        return None
    named = function if hasattr(function, "__qualname__") else type(function)
    return f"{named.__module__}.{named.__qualname__}"


def continues_earlier_fit(trainer: pl.Trainer) -> bool:
    """Whether this ``fit`` goes on with the run an earlier ``fit`` on the same Trainer left (``global_step > 0``,
    no checkpoint to resume from). A callback then keeps its run's state (history, reference, last step measured)
    as a resume from a checkpoint restores it; a new Trainer starts a new run.

    Examples:
        >>> import pytorch_lightning as pl
        >>> continues_earlier_fit(pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False))
        False
    """
    return trainer.global_step > 0 and trainer.ckpt_path is None


def continues_run(trainer: pl.Trainer, restored: bool) -> bool:
    """Whether this ``fit`` goes on with a run whose state a callback keeps (its ``.history``, its reference, the last
    step it measured), the rule every lightning_nt callback follows when training starts:

    - resumed with ``ckpt_path`` from a checkpoint that held the callback's state (``restored``: its
      ``load_state_dict`` ran): the run goes on from the state the checkpoint saved;
    - another ``fit`` on the same Trainer (:func:`continues_earlier_fit`): the run goes on from the state the earlier
      fit left;
    - otherwise (a new Trainer without a checkpoint, even with the same callback object) a new run starts: a new
      history, and a new reference where the reference is the start of the run, as Lightning's own
      ``LearningRateMonitor`` starts its values anew when training starts.

    A state loaded by ``validate``/``test(ckpt_path=...)`` counts only for a ``fit`` that resumes from a checkpoint.

    Examples:
        >>> import pytorch_lightning as pl
        >>> new = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> continues_run(new, restored=False)
        False
    """
    return (restored and trainer.ckpt_path is not None) or continues_earlier_fit(trainer)


def _clone_named(tensors: Iterator[tuple[str, Tensor]]) -> dict[str, Tensor]:
    return {name: t.detach().clone() for name, t in tensors}


def _clone_or_none(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.detach().clone()


def _copy_back(tensors: Iterator[tuple[str, Tensor]], saved: dict[str, Tensor]) -> None:
    for name, tensor in tensors:
        if name in saved:
            tensor.copy_(saved[name])


def _state_names(module: nn.Module) -> set[str]:
    """The names of every parameter and buffer of ``module``."""
    return {name for name, _ in itertools.chain(module.named_parameters(), module.named_buffers())}


def _remove_registered_since(module: nn.Module, registered: set[str]) -> None:
    """Unregister the parameters and buffers of ``module`` whose names are not in ``registered``."""
    for name in sorted(_state_names(module) - registered):
        owner, _, leaf = name.rpartition(".")
        delattr(module.get_submodule(owner), leaf)
