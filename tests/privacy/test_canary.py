"""The canary harness (tests/privacy/canary.py) over every release channel and every clipping engine."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_nt import DPStrategy
from tests.helpers import tiny_trainer
from tests.privacy.canary import (
    SAMPLING_SEED,
    Audited,
    assert_only_the_noisy_update_differs,
    first_batch_indices,
    fit,
    releases_of,
    tensors_left_on,
)

C = 0.5


class PerExampleLosses(Audited):
    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels, reduction="none")


def _strategy(max_grad_norm=C, **kwargs):
    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the seed warning: both runs must draw the same batches
            return DPStrategy(noise_multiplier=1.0, max_grad_norm=max_grad_norm, seed=SAMPLING_SEED, **kwargs)

    return make


@pytest.mark.parametrize(
    ("kwargs", "module"),
    [
        ({}, Audited),
        ({"grad_sample_mode": "functorch"}, Audited),
        ({"grad_sample_mode": "ghost"}, PerExampleLosses),
        ({"grad_sample_mode": "bk"}, Audited),
        ({"max_physical_batch_size": 5}, Audited),
        ({"max_grad_norm": 50.0}, Audited),  # only the canary is clipped: a clip fraction would tell
    ],
    ids=["hooks", "functorch", "ghost", "bk", "virtual-steps", "only-the-canary-clipped"],
)
def test_only_the_noisy_update_depends_on_a_canary(tmp_path, kwargs, module):
    """Issue 11.1 (summed_grad left on the parameters) and 11.2 (dp/clip_fraction) fail this on the old code."""
    make = _strategy(**kwargs)
    batch = first_batch_indices(make, module)
    assert len(batch) > 5
    without = releases_of(make, None, tmp_path, module=module, max_steps=1)
    canary = releases_of(make, batch[0], tmp_path, module=module, max_steps=1)
    moved = sum((canary.weights[n] - without.weights[n]).norm() for n in without.weights)
    assert moved > 0  # the canary was in the batch and acted through the update
    assert_only_the_noisy_update_differs(without, canary, kwargs.get("max_grad_norm", C), expected_batch=16.0)


class Poisoned(Audited):
    canary_scale = float("nan")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_physical_batch_size": 5},
        {"grad_sample_mode": "bk"},
        {"grad_sample_mode": "bk", "max_physical_batch_size": 5},
    ],
    ids=["hooks", "virtual-steps", "bk", "bk-virtual-steps"],
)
def test_a_poisoned_record_contributes_zero_and_nothing_else_tells(tmp_path, kwargs):
    """Issue 11.4: one NaN record made every weight NaN, which told with certainty that it was sampled."""
    make = _strategy(**kwargs)
    batch = first_batch_indices(make)
    without = releases_of(make, None, tmp_path, module=Poisoned, max_steps=1)
    with pytest.warns(UserWarning, match="1 per-example gradient"):
        poisoned = releases_of(make, batch[0], tmp_path, module=Poisoned, max_steps=1)
    assert all(torch.isfinite(w).all() for w in poisoned.weights.values())
    assert_only_the_noisy_update_differs(without, poisoned, C, expected_batch=16.0)


def test_ghost_clipping_stops_before_releasing_a_poisoned_step(tmp_path):
    class PoisonedLosses(Poisoned, PerExampleLosses):
        pass

    make = _strategy(grad_sample_mode="ghost")
    batch = first_batch_indices(make, PerExampleLosses)
    with pytest.raises(RuntimeError, match="not finite"):
        releases_of(make, batch[0], tmp_path, module=PoisonedLosses, max_steps=1)


class SkipsTheCanary(Audited):
    """Returns None when the batch holds a huge input: a data-dependent skip."""

    def training_step(self, batch, batch_idx):
        return None if batch[0].abs().max() > 1e3 else super().training_step(batch, batch_idx)


def test_a_data_dependent_skip_is_refused_and_leaves_nothing_behind(tmp_path):
    """Issue 11.3: with the canary the step was skipped (epsilon 0), without it taken (epsilon > 0)."""
    make = _strategy()
    batch = first_batch_indices(make, SkipsTheCanary)
    without = releases_of(make, None, tmp_path, module=SkipsTheCanary, max_steps=1)
    assert without.epsilon > 0
    module = SkipsTheCanary(batch[0])
    with pytest.raises(RuntimeError, match="returned None"):
        fit(make(), module, max_steps=1)
    left, fresh = tensors_left_on(module), tensors_left_on(SkipsTheCanary(batch[0]))
    assert left.keys() == fresh.keys() and all(torch.equal(left[k], fresh[k]) for k in left)  # metric states only
    assert all(p.grad is None for p in module.parameters())


class ReleaseCounter(pl.Callback):
    """Counts noisy releases independently of the strategy: every step whose update moved the weights."""

    releases = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if any(not torch.equal(b, p) for b, p in zip(self.before, pl_module.parameters())):
            ReleaseCounter.releases += 1


def _rebuilt_epsilon(sigma, sample_rate, releases, delta=1e-5, accountant="rdp"):
    """Opacus's own accountant, fed one step per release counted by watching the weights."""
    rebuilt = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(releases):
        rebuilt.step(noise_multiplier=sigma, sample_rate=sample_rate)
    return rebuilt.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    ("batch_size", "accountant"),
    [(16, "rdp"), (1, "rdp"), (16, "prv")],
    ids=["batches", "mostly-empty-batches", "batches-prv"],
)
def test_epsilon_matches_releases_counted_by_watching_the_weights_across_a_resume(tmp_path, batch_size, accountant):
    ReleaseCounter.releases = 0
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    first = DPStrategy(noise_multiplier=1.1, accountant=accountant)
    fit(first, Audited(batch_size=batch_size), callbacks=[ReleaseCounter(), checkpoint], max_epochs=1,
         enable_checkpointing=True)  # fmt: skip
    steps = 64 // batch_size
    resumed = DPStrategy(noise_multiplier=1.1, accountant=accountant)
    trainer = tiny_trainer(None, strategy=resumed, callbacks=[ReleaseCounter()], max_epochs=2, limit_val_batches=0)
    trainer.fit(Audited(batch_size=batch_size), ckpt_path=str(tmp_path / f"epoch=0-step={steps}.ckpt"))
    assert ReleaseCounter.releases == trainer.global_step == 2 * steps
    rebuilt = _rebuilt_epsilon(1.1, batch_size / 64, ReleaseCounter.releases, accountant=accountant)
    assert resumed.epsilon == pytest.approx(rebuilt, rel=1e-9)


def test_epsilon_matches_releases_counted_by_watching_the_weights_at_the_budget(tmp_path):
    ReleaseCounter.releases = 0
    strategy = DPStrategy(target_epsilon=2.0, accountant="rdp")
    with pytest.warns(UserWarning, match="budget reached"):
        trainer = fit(strategy, Audited(), callbacks=[ReleaseCounter()], max_epochs=2)
        resumed = DPStrategy(target_epsilon=2.0, accountant="rdp")
        path = tmp_path / "stopped.ckpt"
        trainer.save_checkpoint(path)
        trainer = tiny_trainer(None, strategy=resumed, callbacks=[ReleaseCounter()], max_epochs=4, limit_val_batches=0)
        trainer.fit(Audited(), ckpt_path=str(path))  # resumed after a budget stop: its skipped step is accounted for
    sigma = strategy.noise_multiplier
    assert resumed.epsilon == pytest.approx(_rebuilt_epsilon(sigma, 0.25, ReleaseCounter.releases), rel=1e-9)
    assert resumed.epsilon <= 2.0
