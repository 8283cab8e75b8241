import copy
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant, RDPAccountant
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.demos.boring_classes import BoringModel
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_nt import DPStrategy, IterateAveraging
from lightning_nt.common.validation import ArgumentError
from lightning_nt.privacy import AugmentedViews, PoissonBatchSampler
from tests.helpers import TinyClassifier, classification_data, tiny_trainer


class Plain(TinyClassifier):
    """SGD with lr 1 and no momentum: an update is minus the (private) gradient."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class RecordUpdate(pl.Callback):
    """Keeps the training batch of step ``at``, the weights before it and the update it made."""

    def __init__(self, at=0):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            self.batch = [t.clone() for t in batch]
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at + 1 and not hasattr(self, "update"):
            self.update = {n: p.detach() - self.before[n] for n, p in pl_module.named_parameters()}


def _fit(strategy, module=None, callbacks=(), **kwargs):
    pl.seed_everything(0)
    module = (module or (lambda: Plain(num_samples=64, batch_size=16)))()
    trainer = tiny_trainer(None, strategy=strategy, callbacks=list(callbacks), num_sanity_val_steps=0, **kwargs)
    trainer.fit(module)
    return module, trainer


def _clipped_sum(module, weights, batch, max_grad_norm, views=1):
    """Independent reference: per-example gradients by torch.func.vmap(grad) (the mean over an example's
    ``views`` rows, if any), clipped to C, summed."""
    names = list(weights)

    def loss_of_one(params, x, y):
        logits = functional_call(module, dict(zip(names, params)), (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    per_row = vmap(grad(loss_of_one), in_dims=(None, 0, 0))([weights[n] for n in names], *batch)
    per_example = [g.reshape(-1, views, *g.shape[1:]).mean(1) for g in per_row]
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in per_example], dim=1).norm(dim=1)
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("i,i...->...", factors, g) for n, g in zip(names, per_example)}


def test_noiseless_update_equals_the_clipped_sum_over_the_expected_batch():
    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5)
    with pytest.warns(UserWarning, match="noise_multiplier=0"):
        module, _ = _fit(strategy, callbacks=[record], max_steps=1)
    expected = _clipped_sum(module, record.before, record.batch, 0.5)
    assert len(record.batch[0]) > 0
    for name, update in record.update.items():
        torch.testing.assert_close(update, -expected[name] / 16.0, rtol=1e-5, atol=1e-6)  # q N = 16/64 * 64
    assert strategy.epsilon == math.inf


class PerExample(Plain):
    """Returns the [B] per-example losses, as ghost clipping needs."""

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return F.cross_entropy(self(inputs), labels, reduction="none")


def test_ghost_clipping_update_equals_the_clipped_sum():
    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5, grad_sample_mode="ghost")
    module, _ = _fit(
        strategy, module=lambda: PerExample(num_samples=64, batch_size=16), callbacks=[record], max_steps=1
    )
    expected = _clipped_sum(module, record.before, record.batch, 0.5)
    for name, update in record.update.items():
        torch.testing.assert_close(update, -expected[name] / 16.0, rtol=1e-4, atol=1e-6)


def test_ghost_clipping_runs_through_empty_batches_and_needs_per_example_losses():
    strategy = DPStrategy(grad_sample_mode="ghost")
    _, trainer = _fit(strategy, module=lambda: PerExample(num_samples=64, batch_size=1), max_epochs=1)
    assert trainer.global_step == 64 and math.isfinite(strategy.epsilon)
    with pytest.raises(RuntimeError, match="per-example losses"):
        _fit(DPStrategy(grad_sample_mode="ghost"), max_steps=1)
    with pytest.raises(ValueError, match="ghost"):
        DPStrategy(grad_sample_mode="ghost", max_physical_batch_size=4)
    with pytest.raises(RuntimeError, match="low precision"):
        _fit(DPStrategy(grad_sample_mode="ghost"), module=PerExample, max_steps=1, precision="bf16-mixed")


def test_virtual_steps_give_the_update_of_the_whole_logical_batch():
    class Watched(Plain):
        largest = 0

        def training_step(self, batch, batch_idx):
            Watched.largest = max(Watched.largest, len(batch[0]))
            return super().training_step(batch, batch_idx)

    record = RecordUpdate(at=2)  # later steps must not carry anything of the steps before
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5, max_physical_batch_size=5)
    module, _ = _fit(strategy, module=lambda: Watched(num_samples=64, batch_size=16), callbacks=[record], max_steps=3)
    assert len(record.batch[0]) > 5 and Watched.largest == 5
    expected = _clipped_sum(module, record.before, record.batch, 0.5)
    for name, update in record.update.items():
        torch.testing.assert_close(update, -expected[name] / 16.0, rtol=1e-5, atol=1e-6)


def test_augmentation_multiplicity_averages_each_examples_views_before_clipping():
    class Augmented(Plain):
        def train_dataloader(self):
            views = AugmentedViews(classification_data(64), lambda x: x + 0.5 * torch.randn_like(x), multiplicity=3)
            return DataLoader(views, batch_size=16)

    record = RecordUpdate()
    strategy = DPStrategy(
        noise_multiplier=0.0, max_grad_norm=0.5, augmentation_multiplicity=3, max_physical_batch_size=4
    )
    module, _ = _fit(strategy, module=lambda: Augmented(num_samples=64, batch_size=16), callbacks=[record], max_steps=1)
    inputs, labels = record.batch
    assert inputs.shape[1:] == (3, 8) and not torch.equal(inputs[:, 0], inputs[:, 1])
    expected = _clipped_sum(module, record.before, (inputs.flatten(0, 1), labels.flatten(0, 1)), 0.5, views=3)
    for name, update in record.update.items():
        torch.testing.assert_close(update, -expected[name] / 16.0, rtol=1e-5, atol=1e-6)


class Wide(pl.LightningModule):
    """A loss whose per-example gradients are exactly zero, so an update is the noise alone."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(100, 100)

    def training_step(self, batch, batch_idx):
        return (self.layer(batch[0]) * 0.0).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(400, 100)), batch_size=40)


def test_noise_std_times_expected_batch_is_sigma_c():
    record = RecordUpdate()
    _fit(DPStrategy(noise_multiplier=1.3, max_grad_norm=0.7), module=Wide, callbacks=[record], max_steps=1)
    noise = torch.cat([u.flatten() for u in record.update.values()]) * 40.0  # expected batch q N = 40
    assert noise.std().item() == pytest.approx(1.3 * 0.7, rel=0.05)
    assert abs(noise.mean().item()) < 0.05


@pytest.mark.parametrize(("name", "reference"), [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_equals_an_independently_built_accountant(name, reference):
    strategy = DPStrategy(noise_multiplier=0.9, accountant=name, delta=1e-5)
    _, trainer = _fit(strategy, max_epochs=2)
    independent = reference()
    for _ in range(trainer.global_step):
        independent.step(noise_multiplier=0.9, sample_rate=0.25)
    assert trainer.global_step == 8  # 1/q = 4 Poisson steps per epoch
    assert strategy.epsilon == pytest.approx(independent.get_epsilon(delta=1e-5), rel=1e-9)
    assert trainer.callback_metrics["dp/epsilon"].item() == pytest.approx(strategy.epsilon, rel=1e-6)
    for tag in ("dp/delta", "dp/noise_multiplier", "dp/sample_rate"):
        assert tag in trainer.callback_metrics
    assert "dp/clip_fraction" not in trainer.callback_metrics  # a noiseless statistic of the batch: opt-in only


def test_neighbouring_batches_differ_by_at_most_max_grad_norm():
    """Sensitivity through the user's own training_step: drop one example, the summed update moves <= C."""
    updates = []
    for drop in (False, True):
        record = RecordUpdate()

        class Neighbour(Plain):
            def training_step(self, batch, batch_idx, drop=drop):
                inputs, labels = batch
                if drop:
                    inputs, labels = inputs[1:], labels[1:]
                return super().training_step((inputs, labels), batch_idx)

        with pytest.warns(UserWarning, match="reproducible"):  # both runs must draw the same batch
            strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.3, seed=7)
        _fit(
            strategy,
            module=lambda: Neighbour(num_samples=64, batch_size=16),
            callbacks=[record],
            max_steps=1,
        )
        updates.append(torch.cat([u.flatten() for u in record.update.values()]) * 16.0)
    difference = (updates[0] - updates[1]).norm().item()
    assert 0 < difference <= 0.3 + 1e-5


def test_target_epsilon_calibrates_and_is_never_exceeded(tmp_path):
    strategy = DPStrategy(target_epsilon=2.0, delta=1e-5, accountant="rdp")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    _, trainer = _fit(strategy, callbacks=[checkpoint], max_epochs=3, enable_checkpointing=True)
    assert strategy.noise_multiplier > 0.5 and trainer.global_step == 12
    assert 1.9 < strategy.epsilon <= 2.0
    # resumed with a longer plan: the noise stays, so the strategy stops before the step that would exceed
    resumed = DPStrategy(target_epsilon=2.0, delta=1e-5, accountant="rdp")
    trainer = tiny_trainer(None, strategy=resumed, max_epochs=10, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="budget reached"):
        trainer.fit(Plain(num_samples=64, batch_size=16), ckpt_path=str(tmp_path / "epoch=2-step=12.ckpt"))
    assert resumed.noise_multiplier == strategy.noise_multiplier
    assert resumed.epsilon <= 2.0 and trainer.global_step < 40


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_a_copy_of_the_module_during_a_private_fit_copies_no_optimizer(mode):
    # the hooks engine's row check hooked the layers with a method of the engine: a measurement's deepcopy of the
    # module copied the engine and its DP optimizer, which patched the Opacus optimizer class's `step`, and every
    # later private fit in the process failed ('no attribute _optimizer_step_pre_hooks')
    copied = []

    class CopyTheModule(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            memo = {}
            copy.deepcopy(pl_module, memo)
            copied.append([type(value).__name__ for value in memo.values() if isinstance(value, torch.optim.Optimizer)])

    _fit(
        DPStrategy(noise_multiplier=1.0, grad_sample_mode=mode),
        callbacks=[CopyTheModule()],
        max_epochs=1,
    )
    assert copied and not any(copied), copied


def _resume_after(epochs: int, resumed: DPStrategy, max_epochs: int, folder) -> None:
    """A private run (noise 1.1, RDP) checkpointed for ``epochs`` epochs, then resumed with ``resumed``."""
    checkpoint = ModelCheckpoint(dirpath=folder, save_top_k=-1, every_n_epochs=1)
    first = DPStrategy(noise_multiplier=1.1, accountant="rdp")
    _fit(first, callbacks=[checkpoint], max_epochs=epochs, enable_checkpointing=True)
    trainer = tiny_trainer(None, strategy=resumed, max_epochs=max_epochs, num_sanity_val_steps=0)
    trainer.fit(
        Plain(num_samples=64, batch_size=16), ckpt_path=str(folder / f"epoch={epochs - 1}-step={4 * epochs}.ckpt")
    )


def test_resume_continues_the_ledger_exactly(tmp_path):
    straight = DPStrategy(noise_multiplier=1.1, accountant="rdp")
    _fit(straight, max_epochs=4)
    resumed = DPStrategy(noise_multiplier=1.1, accountant="rdp")
    pl.seed_everything(0)
    _resume_after(2, resumed, max_epochs=4, folder=tmp_path)
    assert resumed.accountant.history == straight.accountant.history
    assert resumed.epsilon == straight.epsilon


def test_resuming_with_other_noise_keeps_the_ledgers_noise_and_says_so(tmp_path):
    # the checkpoint's noise replaced the one given to the strategy without a word
    resumed = DPStrategy(noise_multiplier=2.0, accountant="rdp")
    with pytest.warns(UserWarning, match=r"spent with noise_multiplier=1.1: it continues with that noise, not noise_"):
        _resume_after(1, resumed, max_epochs=2, folder=tmp_path)
    assert resumed.noise_multiplier == 1.1 and {h[0] for h in resumed.accountant.history} == {1.1}


def test_a_checkpoint_without_ledger_refuses_to_resume_privately(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    _fit("auto", callbacks=[checkpoint], max_epochs=1, enable_checkpointing=True)
    trainer = tiny_trainer(None, strategy=DPStrategy(), max_epochs=2, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="no privacy ledger"):
        trainer.fit(Plain(num_samples=64, batch_size=16), ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))


def test_strategy_name_trains_boring_model_with_empty_batches_and_a_second_fit():
    class Boring(BoringModel):
        def train_dataloader(self):
            return DataLoader(self.dataset_with(64), batch_size=1)

        @staticmethod
        def dataset_with(n):
            from pytorch_lightning.demos.boring_classes import RandomDataset

            return RandomDataset(32, n)

    model = Boring()
    trainer = tiny_trainer(None, strategy="dp_sgd", max_epochs=1, limit_val_batches=0)
    trainer.fit(model)
    assert isinstance(trainer.strategy, DPStrategy) and trainer.global_step == 64
    assert math.isfinite(trainer.strategy.epsilon) and trainer.strategy.epsilon > 0
    assert all(torch.isfinite(v) for v in trainer.callback_metrics.values())
    trainer = tiny_trainer(None, strategy="dp_sgd", max_epochs=1, limit_val_batches=0)
    trainer.fit(model)  # hooks were removed at teardown: no "Trying to add hooks twice"


def test_poisson_sampler_shards_one_global_draw():
    single = [sorted(b) for b in PoissonBatchSampler(50, 0.2, seed=3)]
    shards = [list(PoissonBatchSampler(50, 0.2, rank=r, world_size=2, seed=3)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(single) == 5
    for whole, first, second in zip(single, *shards):
        assert sorted(first + second) == whole
    sizes = [len(b) for b in PoissonBatchSampler(1000, 0.01, steps=2000, seed=0)]
    assert sum(sizes) / len(sizes) == pytest.approx(10, rel=0.05)
    assert 0 in [len(b) for b in PoissonBatchSampler(100, 0.01, steps=50, seed=0)]  # empty batches are yielded


def test_composes_with_iterate_averaging():
    averaging = IterateAveraging(mode="ema", decay=0.9, apply_on_end=False)
    _, trainer = _fit(DPStrategy(noise_multiplier=1.0), callbacks=[averaging], max_epochs=2)
    assert averaging.n_averaged == trainer.global_step == 8


class _Iterable(IterableDataset):
    def __iter__(self):
        yield from classification_data(32)


class BatchNormModule(Plain):
    def __init__(self):
        super().__init__(num_samples=64, batch_size=16, norm="batch")


class TwoOptimizers(Plain):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]

    def training_step(self, batch, batch_idx):
        return None


class IterableData(Plain):
    def train_dataloader(self):
        return DataLoader(_Iterable(), batch_size=8)


@pytest.mark.parametrize(
    ("module", "trainer_kwargs", "message"),
    [
        (BatchNormModule, {}, "GroupNorm"),
        (None, {"accumulate_grad_batches": 2}, "accumulate_grad_batches"),
        (None, {"gradient_clip_val": 1.0}, "gradient_clip_val"),
        (None, {"precision": "64-true"}, "precision"),
        (lambda: __import__("tests.helpers", fromlist=["x"]).ManualOptimizationModule(), {}, "automatic optimization"),
        (TwoOptimizers, {}, "multiple optimizers"),
        (IterableData, {}, "IterableDataset"),
    ],
)
def test_guards_fail_before_the_first_step(module, trainer_kwargs, message):
    with pytest.raises(RuntimeError, match=message):
        _fit(DPStrategy(), module=module, max_epochs=1, **trainer_kwargs)


def test_fix_modules_swaps_batchnorm():
    module, trainer = _fit(DPStrategy(fix_modules=True), module=BatchNormModule, max_epochs=1)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in module.modules())
    assert trainer.global_step == 4


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"noise_multiplier": -1}, "noise_multiplier"),
        ({"target_epsilon": 0}, "target_epsilon"),
        ({"delta": 1}, "delta"),
        ({"max_grad_norm": 0}, "max_grad_norm"),
        ({"accountant": "moments"}, "accountant"),
        ({"grad_sample_mode": "magic"}, "grad_sample_mode"),
        ({"grad_sample_mode": "ew"}, "grad_sample_mode"),  # Opacus's hooks have no "ew": it failed only in set-up
        ({"sample_rate": 2}, "sample_rate"),
        ({"max_physical_batch_size": 0}, "max_physical_batch_size"),
        ({"augmentation_multiplicity": 0}, "augmentation_multiplicity"),
    ],
)
def test_bad_input_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DPStrategy(**kwargs)


def test_a_noise_multiplier_beside_a_target_epsilon_is_refused_not_ignored():
    """It was silently replaced by the calibrated one (a run asked for 2.0 trained at 1.19)."""
    with pytest.raises(ArgumentError, match=r"`noise_multiplier=2.0` and `target_epsilon=1.0` were both given"):
        DPStrategy(noise_multiplier=2.0, target_epsilon=1.0)
    assert DPStrategy().noise_multiplier == 1.0 and DPStrategy(noise_multiplier=0.5).noise_multiplier == 0.5
    assert DPStrategy(target_epsilon=1.0).noise_multiplier == 1.0  # until calibrated at fit start


def test_resuming_with_another_sample_rate_still_never_exceeds_the_budget(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_train_steps=4)
    strategy = DPStrategy(target_epsilon=2.0, accountant="rdp")
    _fit(strategy, module=lambda: Plain(num_samples=64, batch_size=4), callbacks=[checkpoint], max_steps=40,
         enable_checkpointing=True)  # fmt: skip
    resumed = DPStrategy(target_epsilon=2.0, accountant="rdp")
    trainer = tiny_trainer(None, strategy=resumed, max_steps=40, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="budget reached"):  # q is 8x larger now: the plan no longer holds
        trainer.fit(Plain(num_samples=64, batch_size=32), ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"))
    assert resumed.epsilon <= 2.0 and trainer.global_step < 40


def test_every_loader_draws_fresh_batches():
    class Recorder(pl.Callback):
        def __init__(self):
            self.batches = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.batches.append(batch[1].tolist())

    recorder = Recorder()
    _fit(DPStrategy(), callbacks=[recorder], max_epochs=2, reload_dataloaders_every_n_epochs=1)
    assert recorder.batches[:4] != recorder.batches[4:]
    with pytest.warns(UserWarning, match="reproducible"):
        DPStrategy(seed=1)


def test_bf16_clipping_never_exceeds_the_clipping_norm():
    class OneLoudExample(Plain):
        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.full((1, 8), 50.0), torch.tensor([2])), batch_size=1)

    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.01)
    _fit(strategy, module=lambda: OneLoudExample(), callbacks=[record], max_steps=1, precision="bf16-mixed")
    update = torch.cat([u.flatten() for u in record.update.values()])
    assert len(record.batch[0]) == 1  # q = 1: the example is always sampled, expected batch 1
    assert 0.0099 < update.norm().item() <= 0.01 * (1 + 1e-5)


def test_callbacks_that_read_training_data_outside_dp_are_refused():
    from lightning_nt import CompressionBoundReporter, GradInit, SharpnessMonitor

    for callback in (GradInit(iterations=1), SharpnessMonitor(), CompressionBoundReporter()):
        with pytest.raises(RuntimeError, match="not covered by the privacy guarantee"):
            _fit(DPStrategy(), callbacks=[callback], max_steps=1)
    with pytest.warns(UserWarning, match="allow_nonprivate_callbacks"):
        _fit(DPStrategy(allow_nonprivate_callbacks=True), callbacks=[GradInit(iterations=1)], max_steps=1)


def test_iterable_dataset_with_an_explicit_rate():
    class Iterable(Plain):
        def train_dataloader(self):
            return DataLoader(_Iterable(), batch_size=8)

    strategy = DPStrategy(sample_rate=0.25)
    with pytest.warns(UserWarning):
        _, trainer = _fit(strategy, module=Iterable, max_steps=3)
    assert trainer.global_step == 3 and strategy.optimizers[0].expected_batch_size == 8.0


def test_a_none_from_training_step_is_refused_and_leaves_no_raw_gradient():
    """Issue 11.3: a data-dependent skip released 'weights unchanged' without noise and spent nothing."""

    class SkipsOdd(Plain):
        def training_step(self, batch, batch_idx):
            return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    strategy = DPStrategy()
    with pytest.raises(RuntimeError, match="returned None"):
        _fit(strategy, module=lambda: SkipsOdd(num_samples=64, batch_size=16), max_epochs=1)
    module = strategy.lightning_module
    assert all(p.grad is None and not hasattr(p, "summed_grad") for p in module.parameters())


def test_target_epsilon_needs_a_finite_plan():
    with pytest.raises(RuntimeError, match="finite plan"):
        _fit(DPStrategy(target_epsilon=1.0), max_epochs=-1)


def _steps(strategy):
    return sum(steps for _, _, steps in strategy.accountant.history)


def test_each_epochs_poisson_batches_come_from_the_seed_and_the_epoch():
    """With seed= a run resumed at an epoch boundary must draw what the uninterrupted run drew."""
    uninterrupted = PoissonBatchSampler(dataset_size=50, sample_rate=0.2, seed=3)
    epochs = [list(uninterrupted) for _ in range(3)]  # each pass is an epoch
    resumed = PoissonBatchSampler(dataset_size=50, sample_rate=0.2, seed=3, epoch=2)
    assert list(resumed) == epochs[2] and epochs[1] != epochs[2]
    resumed.set_epoch(1)
    assert list(resumed) == epochs[1]


def test_ghost_clipping_takes_a_second_step_with_a_layer_without_a_norm_sampler() -> None:
    """Opacus's ghost hook of a GroupNorm reads `grad_sample`, which the per-step cleanup removes."""
    _, trainer = _fit(
        DPStrategy(grad_sample_mode="ghost"),
        module=lambda: PerExample(num_samples=64, batch_size=16, norm="group"),
        max_steps=2,
    )
    assert trainer.global_step == 2


class _ChangeTrainable(pl.Callback):
    """Unfreezes every parameter (or freezes the first) at the second step: a fine-tuning schedule."""

    def __init__(self, unfreeze: bool) -> None:
        self.unfreeze = unfreeze

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            for parameter in pl_module.parameters() if self.unfreeze else [next(pl_module.parameters())]:
                parameter.requires_grad_(self.unfreeze)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
@pytest.mark.parametrize("unfreeze", [True, False])
def test_a_change_of_the_trainable_parameters_mid_fit_is_refused(mode, unfreeze):
    """Book-keeping and ghost clipping released a parameter unfrozen mid-fit with its ordinary, unclipped gradient."""

    class Module(PerExample if mode == "ghost" else Plain):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            if unfreeze:  # frozen when the fit starts
                next(self.parameters()).requires_grad_(False)

    became = "trainable" if unfreeze else "frozen"
    with pytest.raises(RuntimeError, match=f"trainable parameters changed.*became {became}"):
        _fit(
            DPStrategy(grad_sample_mode=mode),
            module=lambda: Module(num_samples=64, batch_size=16),
            callbacks=[_ChangeTrainable(unfreeze)],
            max_steps=3,
        )
