"""Every capability in a Trainer of the unified ``lightning`` package (``import lightning as L``).

``lightning.pytorch`` is ``pytorch_lightning``'s code under another name, with its own classes: its Trainer accepts
only its own modules and strategies, and a check against one package's class misses the other's. Each capability
runs the same fit through both packages' Trainers and must log the same figures and train the same weights; the DP
strategies come from :mod:`lightning_nt.privacy.unified` (or by name), and the DP guards know the other package's
tuners.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import pytorch_lightning as pl
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import Strategy

import lightning_nt
from lightning_nt import DPDDPStrategy, DPStrategy, IterateAveraging, SubspaceTraining
from lightning_nt.privacy import unified
from tests.contract.capabilities import CAPABILITIES, Capability
from tests.helpers.zoo import ZOO, ZooModule

ENTRY = ZOO["mlp"]
TIMINGS = re.compile(r"seconds|overhead")  # wall-clock figures, different from run to run


def _in_package(package: ModuleType, name: str) -> type:
    """The zoo's MLP module written against ``package`` (the same methods on that package's LightningModule),
    importable as ``name`` from this file (spawned DDP processes unpickle it)."""

    def __init__(self: Any) -> None:
        package.LightningModule.__init__(self)
        self.net = self.network()

    methods = {name: value for name, value in vars(ZooModule).items() if not name.startswith("__")}
    namespace = {**methods, "__init__": __init__, "__module__": __name__, "__qualname__": name}
    return type(name, (package.LightningModule,), namespace)


PytorchLightningModule = _in_package(pl, "PytorchLightningModule")
LightningPytorchModule = _in_package(L.pytorch, "LightningPytorchModule")
MODULES = {pl: PytorchLightningModule, L.pytorch: LightningPytorchModule}


def _fit(
    package: ModuleType, root: Path, callbacks: Any = (), strategy: Any = "auto", devices: int = 1
) -> tuple[Any, Any]:
    torch.manual_seed(0)
    module = MODULES[package]()
    trainer = package.Trainer(
        accelerator="cpu",
        devices=devices,
        max_epochs=1,
        callbacks=list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks],
        strategy=strategy,
        logger=package.loggers.TensorBoardLogger(str(root), name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        log_every_n_steps=1,
        default_root_dir=str(root),
    )
    trainer.fit(module)
    return trainer, module


def _figures(trainer: Any) -> dict[str, float]:
    return {name: float(value) for name, value in trainer.callback_metrics.items() if not TIMINGS.search(name)}


def _assert_same_run(actual: tuple[Any, Any], expected: tuple[Any, Any]) -> None:
    (trainer, module), (expected_trainer, expected_module) = actual, expected
    assert _figures(trainer) == _figures(expected_trainer)
    for (name, value), expected_value in zip(module.state_dict().items(), expected_module.state_dict().values()):
        assert torch.equal(value, expected_value), name


def _callback_capabilities() -> list[Capability]:
    return [c for c in CAPABILITIES if not isinstance(c.build(ENTRY), pl.strategies.Strategy) and not c.refuses(ENTRY)]


@pytest.mark.parametrize("capability", _callback_capabilities(), ids=str)
def test_a_callback_gives_the_same_figures_in_either_packages_trainer(capability: Capability, tmp_path: Path) -> None:
    ours = _fit(L.pytorch, tmp_path / "lightning", capability.build(ENTRY))
    theirs = _fit(pl, tmp_path / "pytorch_lightning", capability.build(ENTRY))
    assert set(capability.tags(ENTRY)) <= set(ours[0].callback_metrics)
    _assert_same_run(ours, theirs)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_the_dp_strategy_of_the_lightning_package_trains_as_ours(mode: str, tmp_path: Path) -> None:
    options = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 0, "grad_sample_mode": mode}
    ours = _fit(L.pytorch, tmp_path / "lightning", strategy=unified.DPStrategy(**options))
    theirs = _fit(pl, tmp_path / "pytorch_lightning", strategy=DPStrategy(**options))
    assert isinstance(ours[0].strategy, Strategy) and ours[0].strategy.epsilon == theirs[0].strategy.epsilon > 0
    _assert_same_run(ours, theirs)


@pytest.mark.ddp
def test_the_ddp_strategy_of_the_lightning_package_trains_as_ours(tmp_path: Path) -> None:
    """The ``lightning`` package's run spawns its ranks (it must pickle); the reference run forks (see ranks.py)."""
    options = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "seed": 0}
    ours = _fit(
        L.pytorch, tmp_path / "lightning", strategy=unified.DPDDPStrategy(start_method="spawn", **options), devices=2
    )
    theirs = _fit(pl, tmp_path / "pytorch_lightning", strategy=DPDDPStrategy(start_method="fork", **options), devices=2)
    _assert_same_run(ours, theirs)


def test_the_strategy_names_reach_the_lightning_packages_trainer() -> None:
    for name, cls in (("dp_sgd", unified.DPStrategy), ("dp_sgd_ddp", unified.DPDDPStrategy)):
        trainer = L.Trainer(accelerator="cpu", devices=1 if name == "dp_sgd" else 2, strategy=name, logger=False)
        assert type(trainer.strategy) is cls


class _Unfreezing(L.pytorch.callbacks.BaseFinetuning):
    """A fine-tuning schedule of the ``lightning`` package that changes nothing."""

    def freeze_before_training(self, pl_module: Any) -> None:
        pass

    def finetune_function(self, pl_module: Any, epoch: int, optimizer: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("callback", "match"),
    [
        (lambda: L.pytorch.callbacks.LearningRateFinder(), "LearningRateFinder can't run under DP-SGD"),
        (lambda: L.pytorch.callbacks.GradientAccumulationScheduler({0: 2}), "breaks Poisson sampling"),
        (lambda: _Unfreezing(), "_Unfreezing changes which parameters train"),
    ],
)
def test_the_dp_guards_refuse_the_lightning_packages_callbacks(callback: Any, match: str, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=match):
        _fit(L.pytorch, tmp_path, callback(), strategy=unified.DPStrategy(noise_multiplier=1.0, seed=0))


def test_iterate_averaging_refuses_the_lightning_packages_weight_averaging(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="IterateAveraging and EMAWeightAveraging would both"):
        _fit(L.pytorch, tmp_path, [IterateAveraging(), L.pytorch.callbacks.EMAWeightAveraging()])


def test_subspace_training_refuses_the_lightning_packages_fine_tuning_schedules(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="_Unfreezing freezing part of the module"):
        _fit(L.pytorch, tmp_path, [SubspaceTraining(dimension=4), _Unfreezing()])


def _exported_callbacks() -> list[str]:
    exported = {name: getattr(lightning_nt, name) for name in lightning_nt.__all__}
    return sorted(
        name for name, value in exported.items() if isinstance(value, type) and issubclass(value, pl.Callback)
    )


def test_the_lightning_packages_cli_builds_every_callback_from_a_config(tmp_path: Path) -> None:
    names = _exported_callbacks()
    required = {"SubspaceTraining": {"dimension": 4}}
    callbacks = [{"class_path": f"lightning_nt.{name}", "init_args": required.get(name, {})} for name in names]
    trainer = {"callbacks": callbacks, "logger": False, "default_root_dir": str(tmp_path), "strategy": "dp_sgd"}
    cli = LightningCLI(MODULES[L.pytorch], run=False, args={"trainer": trainer}, save_config_callback=None)
    built = [type(callback).__name__ for callback in cli.trainer.callbacks]
    assert set(names) <= set(built) and len(names) >= 8, built
    assert type(cli.trainer.strategy) is unified.DPStrategy
