"""The promises every capability owes every Trainer configuration and entry point, and capabilities combined.

``test_contract.py`` varies the module with one Trainer; this suite keeps one module (the zoo's ``mlp``, given test
and predict steps) and varies what a new user varies: the Trainer's flags (``fast_dev_run``, loggers, validation
schedules, runs that stop mid-epoch, ``overfit_batches``, precision (fp16 with its ``GradScaler`` too),
``barebones``, reloaded loaders, anomaly detection, deterministic algorithms), the data (an ``IterableDataset``,
persistent workers, a ``LightningDataModule``), Lightning's own callbacks beside ours (checkpointing on a monitored
metric, early stopping, an accumulation schedule, ``ReduceLROnPlateau``), and the entry points (``validate``/``test``/
``predict`` without a fit, and after one, then ``fit`` again). Every entry of ``CAPABILITIES`` runs under every
configuration (so a capability added later inherits the suite): it completes, or it refuses by design
(``Capability.trainer_refusals``, checked: before the first step, naming the problem); a capability that promises
no side effects leaves the weights bit for bit those of the same configuration without it.

Then combinations: all our callbacks in one Trainer give the same results in either order; under DP-SGD every
callback that reads the training data is refused by name, and with ``allow_nonprivate_callbacks`` the monitors leave
the private run (weights and epsilon) exactly as it is without them.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
)
from pytorch_lightning.plugins import MixedPrecision
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from lightning_nt import DPStrategy
from lightning_nt.common.capabilities import reads_training_data_outside_step
from tests.contract.capabilities import CAPABILITIES, Capability, Refusal
from tests.contract.test_contract import assert_same_state
from tests.helpers.trainer import read_tensorboard_tags, tiny_trainer
from tests.helpers.zoo import BATCH, TRAIN_SAMPLES, VAL_SAMPLES, ZOO, ZooModule, zoo_data

ENTRY = ZOO["mlp"]
STEPS_PER_EPOCH = TRAIN_SAMPLES // BATCH


class Module(ZooModule):
    """The zoo's ``mlp`` with test and predict steps, and train loaders as a configuration asks for them."""

    def __init__(self, iterable: bool = False, plateau: bool = False, **loader: Any) -> None:
        super().__init__()
        self.iterable, self.plateau, self.loader = iterable, plateau, loader
        self.training_examples = _Counted()

    def train_dataloader(self) -> DataLoader:
        if self.iterable:
            return DataLoader(_Stream(), batch_size=BATCH)
        return DataLoader(self.training_examples, batch_size=BATCH, **self.loader)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        if not self.plateau:
            return optimizer
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "monitor": "val_loss"}}

    def test_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = self.unpack(batch)
        self.log("test_loss", self.loss(self(inputs), targets))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset(VAL_SAMPLES, 2), batch_size=VAL_SAMPLES)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(self.unpack(batch)[0])

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class _Counted(Dataset):
    """The training examples, counting every read (``num_workers=0``: all in this process)."""

    def __init__(self) -> None:
        self.examples, self.reads = TensorDataset(*zoo_data(TRAIN_SAMPLES, 0)), 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        self.reads += 1
        return self.examples[index]


class _Stream(IterableDataset):
    """The training examples as a stream without ``__len__``."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        inputs, labels = zoo_data(TRAIN_SAMPLES, 0)
        return iter(zip(inputs, labels))


class DataModule(pl.LightningDataModule):
    """The module's loaders from a ``LightningDataModule`` (the module then has none of its own in use)."""

    def __init__(self) -> None:
        super().__init__()
        self.source = Module()

    def train_dataloader(self) -> DataLoader:
        return self.source.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self.source.val_dataloader()


def _fit(trainer: pl.Trainer, module: Module) -> None:
    trainer.fit(module)


def _fit_with_datamodule(trainer: pl.Trainer, module: Module) -> None:
    trainer.fit(module, datamodule=DataModule())


def _evaluate_without_fit(trainer: pl.Trainer, module: Module) -> None:
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    assert trainer.validate(module) and trainer.test(module) and trainer.predict(module)
    assert all(torch.equal(tensor, before[name]) for name, tensor in module.state_dict().items())


def _fit_evaluate_fit_again(trainer: pl.Trainer, module: Module) -> None:
    trainer.fit(module)
    assert trainer.validate(module) and trainer.predict(module)
    assert trainer.test(module, ckpt_path="best")
    trainer.fit_loop.max_epochs += 1
    trainer.fit(module)


@dataclasses.dataclass(frozen=True)
class Configuration:
    """A Trainer set-up and an entry point, as a user writes them."""

    name: str
    trainer: Callable[[], dict[str, Any]] = dict
    """Trainer arguments (fresh callbacks each call) on top of ``tiny_trainer``'s, two epochs."""
    module: Callable[[], Module] = Module
    run: Callable[[pl.Trainer, Module], None] = _fit
    steps: int = 2 * STEPS_PER_EPOCH
    """Optimizer steps the run ends with."""

    def __str__(self) -> str:
        return self.name


def _loggers() -> dict[str, Any]:
    return {"enable_progress_bar": True, "num_sanity_val_steps": -1, "val_check_interval": 0.5}


def _lightning_callbacks() -> dict[str, Any]:
    return {
        "enable_checkpointing": True,
        "callbacks": [
            ModelCheckpoint(monitor="val_loss", save_top_k=2),
            EarlyStopping(monitor="val_loss", patience=3),
            LearningRateMonitor(),
        ],
    }


def _fp16_mixed_on_cpu() -> MixedPrecision:
    """``precision="16-mixed"`` as on a GPU (fp16 autocast, a ``GradScaler`` scaling the loss, unscaling the gradients
    and skipping steps with inf), on the CPU, where the Trainer's flag refuses it but the plugin runs. The first loss
    scale is large enough that the first steps overflow and are skipped, as a run's first steps often are."""
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**20))


CONFIGURATIONS = [
    Configuration("fast_dev_run", lambda: {"fast_dev_run": True}, steps=1),
    Configuration("loggers_sanity_all_val_twice_per_epoch", _loggers),
    Configuration("no_logger_no_validation", lambda: {"logger": False, "limit_val_batches": 0}),
    Configuration(
        "stop_mid_epoch_validate_every_2",
        lambda: {"max_steps": STEPS_PER_EPOCH + 2, "max_epochs": -1, "check_val_every_n_epoch": 2},
        steps=STEPS_PER_EPOCH + 2,
    ),
    Configuration("overfit_batches", lambda: {"overfit_batches": 1}, steps=2),
    Configuration("iterable_dataset", module=lambda: Module(iterable=True)),
    Configuration("persistent_workers", module=lambda: Module(num_workers=1, persistent_workers=True, shuffle=True)),
    Configuration("bf16_mixed", lambda: {"precision": "bf16-mixed"}),
    Configuration("bf16_true", lambda: {"precision": "bf16-true"}),
    Configuration("fp16_mixed_grad_scaler", lambda: {"plugins": [_fp16_mixed_on_cpu()]}),
    Configuration(
        "barebones",
        lambda: {
            "barebones": True,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": None,
        },
    ),
    Configuration("reload_dataloaders", lambda: {"reload_dataloaders_every_n_epochs": 1}),
    Configuration("detect_anomaly_no_inference_mode", lambda: {"detect_anomaly": True, "inference_mode": False}),
    Configuration("deterministic", lambda: {"deterministic": True, "benchmark": False}),
    Configuration("evaluate_without_fit", run=_evaluate_without_fit, steps=0),
    Configuration("lightning_callbacks_fit_evaluate_fit", _lightning_callbacks, run=_fit_evaluate_fit_again, steps=12),
    Configuration(
        "accumulation_schedule",
        lambda: {"callbacks": [GradientAccumulationScheduler({1: 2})]},
        module=lambda: Module(plateau=True),
        run=_fit_with_datamodule,
        steps=STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2,
    ),
]


@dataclasses.dataclass
class Run:
    module: Module
    trainer: pl.Trainer
    built: Any
    error: BaseException | None
    warnings: list[str]


def run(
    configuration: Configuration, built: Any, arguments: dict[str, Any], root: Path, dp: DPStrategy | None = None
) -> Run:
    """Run ``configuration`` with ``built`` (given to the Trainer as ``arguments``), catching any error."""
    torch.manual_seed(0)
    module = configuration.module()
    settings = {"max_epochs": 2, **configuration.trainer()}
    callbacks = [*arguments.get("callbacks", []), *settings.pop("callbacks", [])]
    strategy = arguments.get("strategy", dp)
    if strategy is not None:
        settings["strategy"] = strategy
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = tiny_trainer(root, callbacks=callbacks, **settings)
        if "logger" not in settings:
            trainer.loggers = [*trainer.loggers, pl.loggers.CSVLogger(root, name="csv", version="")]
        try:
            configuration.run(trainer, module)
        except Exception as raised:  # the test says which errors are allowed
            error = raised
    return Run(module, trainer, built, error, [str(w.message) for w in caught])


def refused(outcome: Run, refusal: Refusal) -> bool:
    """Refused as declared: an error before the first optimizer step, or a warning, matching the message."""
    if outcome.error is not None:
        return outcome.trainer.global_step == 0 and re.search(refusal.match, str(outcome.error)) is not None
    return any(re.search(refusal.match, message) for message in outcome.warnings)


_BASELINES: dict[str, Run] = {}


def baseline(configuration: Configuration, root: Path) -> Run:
    """The configuration without any capability (run once)."""
    if configuration.name not in _BASELINES:
        _BASELINES[configuration.name] = run(configuration, None, {}, root)
    outcome = _BASELINES[configuration.name]
    if outcome.error is not None:
        raise outcome.error
    return outcome


def assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    expected_state = expected.state_dict()
    different = [name for name, value in actual.state_dict().items() if not torch.equal(value, expected_state[name])]
    assert not different, f"not bit for bit the run without it: {different}"


def logged_to_csv(root: Path) -> set[str]:
    with open(root / "csv" / "metrics.csv", newline="") as file:
        return set(next(csv.reader(file)))


@pytest.mark.parametrize("configuration", CONFIGURATIONS, ids=str)
@pytest.mark.parametrize("capability", CAPABILITIES, ids=str)
def test_configuration(
    capability: Capability, configuration: Configuration, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """It completes (or refuses by design, before the first step); where it promises no side effects, the weights
    are those of the same configuration without it; its tags reach every logger."""
    built, arguments = capability.attach(ENTRY)
    outcome = run(configuration, built, arguments, tmp_path)
    refusal = capability.trainer_refusals.get(configuration.name) or capability.refuses(ENTRY)
    if refusal is not None and not (refusal.optional and outcome.error is None):
        assert refused(outcome, refusal), f"expected a refusal matching {refusal.match!r}; got {outcome.error!r}"
        return
    if outcome.error is not None:
        raise outcome.error
    assert outcome.trainer.global_step == configuration.steps
    if capability.side_effect_free:
        assert_same_weights(outcome.module, baseline(configuration, tmp_path_factory.mktemp("baseline")).module)
    if configuration.name == "loggers_sanity_all_val_twice_per_epoch":
        tags = capability.tags(ENTRY)
        assert not [tag for tag in tags if tag not in logged_to_csv(tmp_path)], "missing from the CSV logger"
        assert not [tag for tag in tags if tag not in read_tensorboard_tags(tmp_path)["scalars"]], "missing from TB"


class _LossScales(pl.Callback):
    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.initial = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())


def test_the_fp16_configuration_skips_some_steps_and_takes_others(tmp_path: Path) -> None:
    """The capabilities meet both kinds of fp16 step: overflows the scaler skips (the scale halves), and updates."""
    configuration = next(c for c in CONFIGURATIONS if c.name == "fp16_mixed_grad_scaler")
    scales = _LossScales()
    outcome = run(configuration, None, {"callbacks": [scales]}, tmp_path)
    assert outcome.error is None and len(scales.scales) == configuration.steps
    skipped = sum(after < before for before, after in zip([2.0**20, *scales.scales], scales.scales))
    assert 0 < skipped < configuration.steps
    assert any(not torch.equal(p, q) for p, q in zip(outcome.module.parameters(), scales.initial))


# ---- combinations of our capabilities -------------------------------------------------------------------------


def _one_per_class(predicate: Callable[[Capability, Any], bool]) -> list[Capability]:
    """The first capability of each callback class (not strategies, not lists) that satisfies ``predicate``."""
    chosen: dict[type, Capability] = {}
    for capability in CAPABILITIES:
        built = capability.build(ENTRY)
        if isinstance(built, pl.Callback) and predicate(capability, built):
            chosen.setdefault(type(built), capability)
    return list(chosen.values())


def _fit_together(capabilities: list[Capability], root: Path, dp: DPStrategy | None = None) -> tuple[Run, list[Any]]:
    callbacks = [capability.build(ENTRY) for capability in capabilities]
    return run(CONFIGURATIONS[1], callbacks, {"callbacks": callbacks}, root, dp), callbacks


def test_all_our_callbacks_in_one_trainer_give_the_same_results_in_either_order(tmp_path: Path) -> None:
    """GradInit rescales before any monitor takes its step-0 reference; the applied average is what every end-of-fit
    report describes; nothing else interacts: each capability's results don't depend on the order of ``callbacks=``.
    (SubspaceTraining re-draws the module: it is combined in ``test_contract.py`` with the reporter.)"""
    together = _one_per_class(lambda capability, built: "Subspace" not in capability.name)
    forward, forward_callbacks = _fit_together(together, tmp_path / "forward")
    backward, backward_callbacks = _fit_together(together[::-1], tmp_path / "backward")
    for outcome in (forward, backward):
        if outcome.error is not None:
            raise outcome.error
    backward_callbacks = backward_callbacks[::-1]
    for capability, first, second in zip(together, forward_callbacks, backward_callbacks):
        assert_same_state(capability.state(first), capability.state(second), capability.state_tolerance)
        assert all(tag in forward.trainer.callback_metrics for tag in capability.tags(ENTRY)), capability
    assert_same_weights(forward.module, backward.module)


@pytest.mark.parametrize("capability", _one_per_class(lambda capability, built: True), ids=str)
def test_a_callback_that_reads_training_data_outside_the_step_declares_it(
    capability: Capability, tmp_path: Path
) -> None:
    """DPStrategy refuses what declares ``reads_training_data_outside_step``: a callback that reads training examples
    beyond what the fit itself reads (counted at the dataset) must declare it, and one that doesn't must not."""
    built, arguments = capability.attach(ENTRY)
    outcome = run(CONFIGURATIONS[2], built, arguments, tmp_path)
    if outcome.error is not None:
        raise outcome.error
    fit_alone = baseline(CONFIGURATIONS[2], tmp_path / "baseline").module.training_examples.reads
    reads_more = outcome.module.training_examples.reads > fit_alone
    assert reads_more == reads_training_data_outside_step(built), (outcome.module.training_examples.reads, fit_alone)


def test_under_dp_every_callback_that_reads_training_data_is_refused_by_name(tmp_path: Path) -> None:
    """Their figures would be un-noised functions of the private examples: all are named, before the first step."""
    together = _one_per_class(lambda capability, built: True)
    readers = [type(c.build(ENTRY)).__name__ for c in together if reads_training_data_outside_step(c.build(ENTRY))]
    dp = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    outcome, _ = _fit_together([c for c in together if "Subspace" not in c.name], tmp_path, dp)
    assert outcome.error is not None and outcome.trainer.global_step == 0
    assert readers and all(name in str(outcome.error) for name in readers), outcome.error


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_monitors_allowed_under_dp_leave_the_private_run_unchanged(mode: str, tmp_path: Path) -> None:
    """With ``allow_nonprivate_callbacks=True`` every monitor that promises no side effects leaves the private run
    (weights and epsilon) bit for bit what it is without them: none touches per-example state or the ledger."""
    monitors = _one_per_class(lambda capability, built: capability.side_effect_free)

    def private(capabilities: list[Capability], root: Path) -> Run:
        dp = DPStrategy(
            noise_multiplier=1.0, max_grad_norm=1.0, seed=0, grad_sample_mode=mode, allow_nonprivate_callbacks=True
        )
        outcome, _ = _fit_together(capabilities, root, dp)
        if outcome.error is not None:
            raise outcome.error
        return outcome

    alone, watched = private([], tmp_path / "alone"), private(monitors, tmp_path / "watched")
    assert_same_weights(watched.module, alone.module)
    assert watched.trainer.strategy.epsilon == alone.trainer.strategy.epsilon
