"""The two packages Lightning ships as: ``pytorch_lightning`` and ``lightning.pytorch`` (``import lightning as L``).

They hold the same code under two names, so their classes are distinct: a Trainer of one refuses the other's
strategies and modules, and ``isinstance(callback, pytorch_lightning.callbacks.LearningRateFinder)`` is ``False``
for ``lightning.pytorch``'s tuner. Our callbacks work in either Trainer (Lightning calls their hooks by name); every
check of a user's object against a Lightning class asks :func:`lightning_classes`, which holds that class from each
package installed, so that a check can't pass silently because the user imported the other one. Our callbacks
derive from both packages' ``Callback`` (:class:`lightning_nt.common.callback.Callback`), so that both packages'
``LightningCLI`` accept them in a config (``class_path: lightning_nt.SharpnessMonitor``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from types import ModuleType

__all__ = ["lightning_classes", "lightning_packages"]


@functools.cache
def lightning_packages() -> tuple[ModuleType, ...]:
    """``pytorch_lightning`` (a dependency of lightning_nt), then ``lightning.pytorch`` if ``lightning`` is installed.

    Examples:
        >>> lightning_packages()[0].__name__
        'pytorch_lightning'
    """
    packages = [importlib.import_module("pytorch_lightning")]
    with contextlib.suppress(ImportError):  # else only pytorch_lightning is installed
        packages.append(importlib.import_module("lightning.pytorch"))
    return tuple(packages)


def lightning_classes(*paths: str) -> tuple[type, ...]:
    """The classes at ``paths`` (relative to the package, e.g. ``"callbacks.BaseFinetuning"``) from every installed
    Lightning package that has them: a tuple for ``isinstance``; empty where no installed version has them.

    Examples:
        >>> import pytorch_lightning as pl
        >>> tuners = lightning_classes("callbacks.LearningRateFinder", "callbacks.BatchSizeFinder")
        >>> isinstance(pl.callbacks.BatchSizeFinder(), tuners)
        True
    """
    classes = []
    for path in paths:
        module_path, _, name = path.rpartition(".")
        for package in lightning_packages():
            module = importlib.import_module(f"{package.__name__}.{module_path}") if module_path else package
            if hasattr(module, name):
                classes.append(getattr(module, name))
    return tuple(classes)
