"""Every callback refuses a strategy that shards the parameters (FSDP, DeepSpeed, ModelParallel), by name, in
``setup`` (before anything touches the module): each reads and restores the whole module on every process.

Lightning runs FSDP on CUDA only, so the Trainer here is a CPU Trainer whose strategy is then replaced by a sharded
one, and the callbacks' ``setup`` is called as Lightning calls it first thing in ``fit``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import pytorch_lightning as pl

from tests.contract.capabilities import CAPABILITIES, Capability
from tests.helpers.trainer import tiny_trainer
from tests.helpers.zoo import ZOO

ENTRY = ZOO["mlp"]
SHARDED = {
    "FSDPStrategy": pl.strategies.FSDPStrategy,
    "ModelParallelStrategy": pl.strategies.ModelParallelStrategy,
    "lightning.pytorch FSDPStrategy": L.pytorch.strategies.FSDPStrategy,
}


def _callbacks(capability: Capability) -> list[Any]:
    built = capability.build(ENTRY)
    return built if isinstance(built, list) else [built]


CALLBACK_CAPABILITIES = [c for c in CAPABILITIES if not isinstance(c.build(ENTRY), pl.strategies.Strategy)]


def _with_strategy(strategy: Any) -> pl.Trainer:
    trainer = tiny_trainer()
    trainer._accelerator_connector.strategy = strategy
    return trainer


@pytest.mark.parametrize("strategy", sorted(SHARDED))
@pytest.mark.parametrize("capability", CALLBACK_CAPABILITIES, ids=str)
def test_every_callback_refuses_a_sharded_strategy_in_setup(capability: Capability, strategy: str) -> None:
    trainer = _with_strategy(SHARDED[strategy]())
    for callback in _callbacks(capability):
        name = type(callback).__name__
        with pytest.raises(RuntimeError, match=f"{name} does not support {SHARDED[strategy].__name__}.*strategy='ddp'"):
            callback.setup(trainer, ENTRY.build(), "fit")


@pytest.mark.parametrize("capability", CALLBACK_CAPABILITIES, ids=str)
def test_every_callback_accepts_ddp_in_setup(capability: Capability) -> None:
    trainer = _with_strategy(pl.strategies.DDPStrategy())
    for callback in _callbacks(capability):
        callback.setup(trainer, ENTRY.build(), "validate")
