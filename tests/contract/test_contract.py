"""The promises every capability owes every LightningModule, checked over the zoo (``tests/helpers/zoo.py``).

One parametrised suite, capability x zoo entry: (a) it attaches and the fit completes, or it refuses by design
before the first step with a message naming the problem; (b) where it promises no side effects, the trained
weights are bit for bit those of the same run without it; (c) a run resumed from a mid-run checkpoint ends where
the uninterrupted run ends (weights, and the capability's own state); (d) fitting twice on the same Trainer works;
(e) every constructor argument swept with bad values gives an ``ArgumentError`` naming it; (f) CUDA, fp32 and
bf16-mixed; (g) the logged tags reach ``trainer.callback_metrics`` and a TensorBoard logger.

One two-epoch fit per (capability, entry), with a checkpoint after each epoch, serves (a), (b), (c), (d) and (g).
Known failures are strict xfails from ``tests/contract/known_failures.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from tests.contract.bad_values import sweep, swept_arguments
from tests.contract.capabilities import CAPABILITIES, Capability, Refusal
from tests.contract.known_failures import known_failure, unmatched_rows
from tests.helpers.trainer import read_tensorboard_tags, tiny_trainer
from tests.helpers.zoo import ZOO, ZooEntry

EPOCHS = 2


@dataclasses.dataclass
class Run:
    """One fit of a zoo entry, with or without a capability."""

    module: pl.LightningModule
    trainer: pl.Trainer
    capability: Any
    error: BaseException | None
    warnings: list[str]
    root: Path

    def refused(self, refusal: Refusal) -> bool:
        """Refused as declared: an error before the first optimizer step, or a warning, matching the message."""
        if self.error is not None:
            return self.trainer.global_step == 0 and re.search(refusal.match, str(self.error)) is not None
        return any(re.search(refusal.match, message) for message in self.warnings)

    def checkpoint(self, epoch: int) -> Path:
        return self.root / "checkpoints" / f"epoch={epoch}.ckpt"


def fit(
    capability: Capability | None,
    entry: ZooEntry,
    root: Path,
    ckpt_path: Path | None = None,
    **trainer_arguments: Any,
) -> Run:
    """Fit ``entry`` for two epochs (checkpoints after each) with ``capability`` attached, catching any error."""
    torch.manual_seed(0)
    module = entry.build()
    built, arguments = capability.attach(entry) if capability is not None else (None, {})
    saver = ModelCheckpoint(
        dirpath=root / "checkpoints", filename="{epoch}", save_top_k=-1, save_on_train_epoch_end=True
    )
    trainer = tiny_trainer(
        root,
        max_epochs=EPOCHS,
        enable_checkpointing=True,
        callbacks=[*arguments.pop("callbacks", []), saver],
        **arguments,
        **entry.trainer_arguments,
        **trainer_arguments,
    )
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(module, ckpt_path=ckpt_path)
        except Exception as raised:  # the promises below say which errors are allowed
            error = raised
    return Run(module, trainer, built, error, [str(w.message) for w in caught], root)


_RUNS: dict[tuple[str, str], Run] = {}


@pytest.fixture
def first_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Capability | None, ZooEntry], Run]:
    """The two-epoch fit of (capability, entry), made once and shared by the promises that only read it."""

    def get(capability: Capability | None, entry: ZooEntry) -> Run:
        key = (str(capability), entry.name)
        if key not in _RUNS:
            _RUNS[key] = fit(capability, entry, tmp_path_factory.mktemp(f"{capability}-{entry.name}"))
        return _RUNS[key]

    return get


def cases(promise: str, owed: Callable[[Capability, ZooEntry], bool] = lambda capability, entry: True) -> list[Any]:
    """``(capability, entry)`` parameters where ``promise`` is ``owed``, known failures marked; entries refused by
    design only for the ``attaches`` promise (where the refusal is what is checked)."""
    selected = []
    for capability in CAPABILITIES:
        for entry in ZOO.values():
            refusal = capability.refuses(entry)
            if not owed(capability, entry) or (promise != "attaches" and refusal is not None and not refusal.optional):
                continue
            marks = known_failure(capability.name, entry.name, promise)
            selected.append(pytest.param(capability, entry, id=f"{capability}-{entry}", marks=marks))
    return selected


def completed(run: Run, capability: Capability, entry: ZooEntry) -> None:
    """Skip a promise that an optional refusal made vacuous; fail with the run's own error otherwise."""
    refusal = capability.refuses(entry)
    if refusal is not None and run.refused(refusal):
        pytest.skip(f"{capability} refuses {entry} (allowed: {refusal.match!r})")
    if run.error is not None:
        raise run.error
    assert run.trainer.global_step == EPOCHS * entry.steps_per_epoch


def assert_same_weights(actual: pl.LightningModule, expected: pl.LightningModule) -> None:
    actual_state, expected_state = actual.state_dict(), expected.state_dict()
    assert actual_state.keys() == expected_state.keys()
    different = [name for name, value in actual_state.items() if not _identical(value, expected_state[name])]
    assert not different, f"not bit for bit equal: {different}"


def assert_same_metrics(actual: pl.Trainer, expected: pl.Trainer) -> None:
    """Every metric of ``expected.callback_metrics`` (the module's own) is bit for bit the same in ``actual``."""
    metrics = actual.callback_metrics
    different = [
        name
        for name, value in expected.callback_metrics.items()
        if name not in metrics or not _identical(torch.as_tensor(metrics[name]), torch.as_tensor(value))
    ]
    assert not different, f"the module's own metrics differ: {different}"


def _identical(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit for bit equal, NaN where the other is NaN."""
    if not actual.is_floating_point():
        return torch.equal(actual, expected)
    return actual.shape == expected.shape and torch.allclose(actual, expected, rtol=0.0, atol=0.0, equal_nan=True)


def assert_same_state(actual: Any, expected: Any, rtol: float) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict)
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_same_state(actual[key], expected[key], rtol)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), f"{actual} != {expected}"
        for a, e in zip(actual, expected):
            assert_same_state(a, e, rtol)
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=0.0, equal_nan=True)
    elif isinstance(expected, float) and not math.isnan(expected):
        assert actual == pytest.approx(expected, rel=rtol, abs=0.0, nan_ok=True)
    else:
        assert actual == expected or (actual != actual and expected != expected)


@pytest.mark.parametrize(("capability", "entry"), cases("attaches"))
def test_attaches(capability: Capability, entry: ZooEntry, first_run: Callable[..., Run]) -> None:
    """(a) The fit completes, or the capability refuses before the first step, naming the problem."""
    run = first_run(capability, entry)
    refusal = capability.refuses(entry)
    if refusal is not None and (not refusal.optional or run.error is not None):
        assert run.refused(refusal), (
            f"expected a refusal matching {refusal.match!r} before the first step; got "
            f"{run.error!r} at step {run.trainer.global_step}"
        )
        return
    completed(run, capability, entry)


@pytest.mark.parametrize(("capability", "entry"), cases("tags", lambda capability, entry: bool(capability.tags(entry))))
def test_logs_tags(capability: Capability, entry: ZooEntry, first_run: Callable[..., Run]) -> None:
    """(g) Every promised tag reaches ``trainer.callback_metrics`` and the TensorBoard logger, never as NaN."""
    run = first_run(capability, entry)
    completed(run, capability, entry)
    logged = set(read_tensorboard_tags(run.root)["scalars"])
    tags = capability.tags(entry)
    assert not [tag for tag in tags if tag not in run.trainer.callback_metrics], "missing from callback_metrics"
    assert not [tag for tag in tags if tag not in logged], "missing from TensorBoard"
    assert not [tag for tag in tags if torch.isnan(torch.as_tensor(run.trainer.callback_metrics[tag]))], "NaN"


@pytest.mark.parametrize(
    ("capability", "entry"), cases("no_side_effects", lambda capability, entry: capability.side_effect_free)
)
def test_no_side_effects(capability: Capability, entry: ZooEntry, first_run: Callable[..., Run]) -> None:
    """(b) The trained weights (and buffers) are bit for bit those of the same run without it, and so are the metrics
    the module logs itself (a loss read from ``training_step`` with ``self.log`` not muted would overwrite them)."""
    run = first_run(capability, entry)
    completed(run, capability, entry)
    baseline = first_run(None, entry)
    if baseline.error is not None:
        raise baseline.error
    assert_same_weights(run.module, baseline.module)
    assert_same_metrics(run.trainer, baseline.trainer)


@pytest.mark.parametrize(("capability", "entry"), cases("resume"))
def test_resume(capability: Capability, entry: ZooEntry, first_run: Callable[..., Run], tmp_path: Path) -> None:
    """(c) Resumed from the checkpoint after epoch 0, the run ends where the uninterrupted run ends."""
    uninterrupted = first_run(capability, entry)
    completed(uninterrupted, capability, entry)
    resumed = fit(capability, entry, tmp_path, ckpt_path=uninterrupted.checkpoint(0))
    if resumed.error is not None:
        raise resumed.error
    assert resumed.trainer.global_step == EPOCHS * entry.steps_per_epoch
    assert_same_weights(resumed.module, uninterrupted.module)
    assert_same_state(
        capability.state(resumed.capability), capability.state(uninterrupted.capability), capability.state_tolerance
    )


@pytest.mark.parametrize(("capability", "entry"), cases("fit_twice"))
def test_fit_twice(capability: Capability, entry: ZooEntry, first_run: Callable[..., Run]) -> None:
    """(d) A second ``fit`` on the same Trainer and module (one more epoch) runs."""
    run = first_run(capability, entry)
    completed(run, capability, entry)
    _RUNS.pop((str(capability), entry.name))  # the run is changed from here on
    run.trainer.fit_loop.max_epochs = EPOCHS + 1
    run.trainer.fit(run.module)
    assert run.trainer.global_step == (EPOCHS + 1) * entry.steps_per_epoch


def _constructor_cases() -> Iterator[Any]:
    for capability in CAPABILITIES:
        if capability.constructor is None:
            continue
        for name in swept_arguments(capability.constructor.cls):
            marks = known_failure(capability.name, name, "bad_input")
            yield pytest.param(capability, name, id=f"{capability.constructor.cls.__name__}-{name}", marks=marks)


@pytest.mark.parametrize(("capability", "argument"), list(_constructor_cases()))
def test_bad_input_is_named(capability: Capability, argument: str) -> None:
    """(e) Every bad value of every argument gives an ``ArgumentError`` naming it: none accepted, none obscure."""
    assert capability.constructor is not None
    problems = sweep(capability.constructor, argument)
    assert not problems, "\n".join(problems)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("capability", "entry", "precision"),
    [
        pytest.param(c, ZOO[name], precision, id=f"{c}-{name}-{precision}", marks=known_failure(c.name, name, "cuda"))
        for c in CAPABILITIES
        for name in ("mlp", "conv_groupnorm")
        for precision in ("32-true", "bf16-mixed")
    ],
)
def test_cuda(capability: Capability, entry: ZooEntry, precision: str, tmp_path: Path) -> None:
    """(f) The fit completes on a GPU in fp32 and bf16-mixed, and the tags are logged."""
    # deterministic=False: CUDA has no deterministic adaptive-pooling backward, and bit-for-bit is not the point here
    run = fit(capability, entry, tmp_path, accelerator="gpu", precision=precision, deterministic=False)
    if run.error is not None:
        raise run.error
    assert run.trainer.global_step == EPOCHS * entry.steps_per_epoch
    assert all(tag in run.trainer.callback_metrics for tag in capability.tags(entry))


def test_known_failures_name_existing_cases() -> None:
    """Every row of the known-failure table marks a case of this suite (all are parametrised at import)."""
    assert not unmatched_rows()
