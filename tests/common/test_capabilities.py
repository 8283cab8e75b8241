"""Declarations and ordering shared by the capabilities."""

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor

from lightning_nt import GradInit, SharpnessMonitor
from lightning_nt.common.capabilities import run_before_other_callbacks


class MySharpness(SharpnessMonitor):
    """A user's subclass, defined outside lightning_nt."""


def _trainer(callbacks):
    return pl.Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_a_callback_moves_in_front_of_ours_and_of_users_subclasses_of_ours_only():
    user, subclass, ours, gradinit = LearningRateMonitor(), MySharpness(), SharpnessMonitor(), GradInit()
    trainer = _trainer([user, subclass, ours, gradinit])
    run_before_other_callbacks(trainer, gradinit)
    order = [c for c in trainer.callbacks if c in (user, subclass, ours, gradinit)]
    assert order == [user, gradinit, subclass, ours]


def test_a_callback_already_in_front_stays():
    gradinit, monitor = GradInit(), MySharpness()
    trainer = _trainer([gradinit, monitor])
    run_before_other_callbacks(trainer, gradinit)
    assert [c for c in trainer.callbacks if c in (gradinit, monitor)] == [gradinit, monitor]
