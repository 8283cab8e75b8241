"""One rule for every callback that keeps a run's state (``common.state.continues_run``): a new Trainer without a
checkpoint starts a new run (a new history, a new reference), a resume with ``ckpt_path`` goes on from the state the
checkpoint saved, another ``fit`` on the same Trainer goes on from the state the earlier fit left."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import (
    GradientSignalTest,
    IterateAveraging,
    LazinessMonitor,
    RepresentationSimilarity,
    SharpnessMonitor,
)
from tests.helpers import TinyClassifier, tiny_trainer

EPOCHS = 2  # of 4 steps each


def _history(monitor: Any) -> list[dict[str, float]]:
    """``.history`` without the figures that measure wall time."""
    return [{tag: v for tag, v in e.items() if not tag.endswith(("/seconds", "/overhead"))} for e in monitor.history]


def _average(averaging: IterateAveraging) -> dict[str, Any]:
    return {"n_averaged": averaging.n_averaged, **averaging.averaged_state_dict()}


MONITORS: dict[str, tuple[Callable[[], pl.Callback], Callable[[Any], Any]]] = {
    "SharpnessMonitor": (
        lambda: SharpnessMonitor(every_n_steps=2, num_examples=32, lambda_min=False, tol=1e-2, max_iter=20),
        _history,
    ),
    "RepresentationSimilarity": (lambda: RepresentationSimilarity(num_examples=32), _history),
    "LazinessMonitor": (lambda: LazinessMonitor(every_n_steps=2, num_examples=16, layers=["net.0"]), _history),
    "GradientSignalTest": (lambda: GradientSignalTest(every_n_steps=2, num_examples=16), _history),
    "IterateAveraging": (IterateAveraging, _average),
}


def _fit(
    callback: pl.Callback,
    epochs: int | tuple[int, ...] = EPOCHS,
    seed: int = 0,
    checkpoints: Path | None = None,
    ckpt_path: Path | None = None,
) -> None:
    """Fit a new ``TinyClassifier`` (drawn after seeding) on a new Trainer, and again on the same Trainer for every
    further entry of ``epochs`` (the epoch each fit ends at); save a checkpoint at every epoch end under
    ``checkpoints``, or resume from ``ckpt_path``."""
    pl.seed_everything(seed)
    module = TinyClassifier(num_samples=64, shuffle=False)
    saving = [pl.callbacks.ModelCheckpoint(dirpath=checkpoints, save_top_k=-1)] if checkpoints else []
    trainer = tiny_trainer(None, callbacks=[callback, *saving], enable_checkpointing=bool(saving))
    for index, max_epochs in enumerate(epochs if isinstance(epochs, tuple) else (epochs,)):
        trainer.fit_loop.max_epochs = max_epochs
        trainer.fit(module, ckpt_path=ckpt_path if index == 0 else None)


@pytest.fixture(params=list(MONITORS))
def monitor(request: pytest.FixtureRequest) -> tuple[Callable[[], pl.Callback], Callable[[Any], Any]]:
    return MONITORS[request.param]


def test_a_new_trainer_without_a_checkpoint_starts_a_new_run(monitor) -> None:
    """The callback passed again to a new Trainer holds what a new callback would (found: SharpnessMonitor,
    RepresentationSimilarity and GradientSignalTest appended the new run's measurements to the earlier run's)."""
    make, state = monitor
    reused, new = make(), make()
    _fit(reused, epochs=1, seed=1)
    _fit(reused)
    _fit(new)
    torch.testing.assert_close(state(reused), state(new), rtol=1e-6, atol=1e-9)


def test_another_fit_on_the_same_trainer_goes_on_with_the_run(monitor) -> None:
    make, state = monitor
    twice, uninterrupted = make(), make()
    _fit(twice, epochs=(1, EPOCHS))
    _fit(uninterrupted)
    torch.testing.assert_close(state(twice), state(uninterrupted), rtol=1e-6, atol=1e-9)


def test_a_resume_goes_on_with_the_state_the_checkpoint_saved(monitor, tmp_path: Path) -> None:
    """Resumed from the checkpoint of epoch 0, by a callback that had run before (another run's state in it)."""
    make, state = monitor
    uninterrupted, resumed = make(), make()
    _fit(uninterrupted, checkpoints=tmp_path)
    _fit(resumed, epochs=1, seed=1)
    _fit(resumed, ckpt_path=tmp_path / "epoch=0-step=4.ckpt")
    torch.testing.assert_close(state(resumed), state(uninterrupted), rtol=1e-6, atol=1e-9)


def test_a_state_loaded_to_validate_does_not_carry_into_a_new_run(monitor, tmp_path: Path) -> None:
    """``validate(ckpt_path=...)`` loads the callback's state too; the ``fit`` that follows on that Trainer without a
    checkpoint is a new run from the weights validated (found: the four monitors went on with the checkpoint's run:
    its history, and LazinessMonitor its initialisation, RepresentationSimilarity its probe set and reference)."""
    make, state = monitor
    _fit(make(), checkpoints=tmp_path)
    checkpoint = tmp_path / "epoch=0-step=4.ckpt"
    weights = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    states = []
    for validate_first in (True, False):
        callback = make()
        pl.seed_everything(0)
        module = TinyClassifier(num_samples=64, shuffle=False)
        trainer = tiny_trainer(None, callbacks=[callback], max_epochs=EPOCHS)
        if validate_first:
            trainer.validate(module, ckpt_path=checkpoint, verbose=False)
        else:
            module.load_state_dict(weights)
        trainer.fit(module)
        states.append(state(callback))
    torch.testing.assert_close(states[0], states[1], rtol=1e-6, atol=1e-9)
