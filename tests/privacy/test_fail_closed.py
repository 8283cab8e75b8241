"""DPStrategy fails closed: issue 11 (items 2, 5-10) and the DP items of issue 10 (11, 13, 17, 24)."""

from __future__ import annotations

import ast
import math
import traceback
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    GradientAccumulationScheduler,
    LearningRateFinder,
    ModelCheckpoint,
)
from pytorch_lightning.tuner import Tuner
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, WeightedRandomSampler

import lightning_nt.privacy
from lightning_nt import DPDDPStrategy, DPStrategy, GradientSignalTest, LazinessMonitor, RepresentationSimilarity
from lightning_nt.common.validation import ArgumentError
from tests.helpers import classification_data, tiny_trainer
from tests.privacy.test_strategy import Plain, RecordUpdate, _fit


def _quiet(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPStrategy(**kwargs)


# -- item 7 / issue 10.24: every constructor argument checked --------------------------------------------------

_BAD_VALUES = {
    "noise_multiplier": ["1", math.nan, math.inf, -1.0, True],  # None: 1.0, or calibrated by target_epsilon
    "target_epsilon": ["8", math.nan, math.inf, 0.0, -1.0, True],
    "delta": ["1e-5", math.nan, math.inf, 0.0, 1.0, None],
    "max_grad_norm": ["1", math.nan, math.inf, 0.0, -1.0, None],
    "accountant": ["moments", 1, None],
    "grad_sample_mode": ["magic", 1, None],
    "sample_rate": ["0.1", math.nan, math.inf, 0.0, 1.5, True],
    "poisson_sampling": ["no", 1, None],
    "max_physical_batch_size": ["4", 4.5, math.nan, 0, True],
    "augmentation_multiplicity": ["2", 2.5, math.nan, math.inf, 0, True, None],
    "stop_at_budget": ["no", 0, None],
    "secure_mode": ["no", 1, None],
    "fix_modules": ["no", 1, None],
    "seed": ["1", 1.5, math.nan, True],
    "allow_nonprivate_callbacks": ["no", 1, None],
    "log_clip_fraction": ["yes", 1, None],
    "sensitivity_probe": ["yes", 1, None],
}


@pytest.mark.parametrize("strategy", [DPStrategy, DPDDPStrategy])
@pytest.mark.parametrize(
    ("argument", "value"), [(argument, value) for argument, values in _BAD_VALUES.items() for value in values]
)
def test_every_bad_constructor_value_is_refused_naming_the_argument(strategy, argument, value):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        strategy(**{argument: value})


def test_the_sweep_covers_every_constructor_argument():
    import inspect

    arguments = set(inspect.signature(DPStrategy.__init__).parameters) - {"self", "strategy_kwargs"}
    assert arguments == set(_BAD_VALUES)


def test_relations_between_arguments_are_still_checked():
    with pytest.raises(ValueError, match="ghost"):
        DPStrategy(grad_sample_mode="ghost", augmentation_multiplicity=2)


# -- item 2: dp/clip_fraction ---------------------------------------------------------------------------------


def test_clip_fraction_is_only_logged_when_opted_in_as_non_private():
    _, trainer = _fit(DPStrategy(), max_steps=2)
    assert "dp/clip_fraction" not in trainer.callback_metrics
    with pytest.warns(UserWarning, match="NOT covered by the privacy guarantee"):
        strategy = DPStrategy(log_clip_fraction=True)
    _, trainer = _fit(strategy, max_steps=2)
    assert 0.0 <= trainer.callback_metrics["dp/clip_fraction"].item() <= 1.0


# -- item 5: tuners --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tuner", [LearningRateFinder(num_training_steps=4), BatchSizeFinder(max_trials=1)])
def test_tuners_are_refused_before_any_step(tuner):
    record = RecordUpdate()
    with pytest.raises(RuntimeError, match=f"{type(tuner).__name__} can't run under DP-SGD"):
        _fit(DPStrategy(), callbacks=[tuner, record], max_epochs=1)
    assert not hasattr(record, "batch")


def test_the_tuner_api_is_refused():
    trainer = tiny_trainer(None, strategy=DPStrategy(), max_epochs=1, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="LearningRateFinder can't run under DP-SGD"):
        Tuner(trainer).lr_find(Plain(num_samples=64, batch_size=16), num_training=4)


def test_restoring_an_earlier_checkpoint_mid_run_is_refused(tmp_path):
    """What any tuner does: save, train privately, restore, which would drop the later steps from the ledger."""

    class RollBack(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 1:
                trainer.save_checkpoint(tmp_path / "early.ckpt")
            if trainer.global_step == 3:
                trainer._checkpoint_connector.restore(str(tmp_path / "early.ckpt"))

    with pytest.raises(RuntimeError, match="roll the privacy ledger back from 3 to 1"):
        _fit(DPStrategy(), callbacks=[RollBack()], max_epochs=1)


# -- item 6: ledger consistency on resume ---------------------------------------------------------------------


def test_a_hand_edited_ledger_is_refused(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    _fit(DPStrategy(accountant="rdp"), callbacks=[checkpoint], max_epochs=2, enable_checkpointing=True)
    path = tmp_path / "epoch=1-step=8.ckpt"
    saved = torch.load(path, weights_only=False)
    (sigma, rate, steps), = saved["dp_accountant"]["ledger"]["history"]  # fmt: skip
    assert steps == 8
    saved["dp_accountant"]["ledger"]["history"] = [(sigma, rate, 1)]
    torch.save(saved, tmp_path / "edited.ckpt")
    trainer = tiny_trainer(None, strategy=DPStrategy(accountant="rdp"), max_epochs=3, num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match=r"records 1 noisy steps .* but its loop took 8"):
        trainer.fit(Plain(num_samples=64, batch_size=16), ckpt_path=str(tmp_path / "edited.ckpt"))


# -- item 8 / issue 10.13: the user's sampling ------------------------------------------------------------------


class _Buckets(BatchSampler):
    """A length-bucketing batch sampler, as sequence models use."""


class UserBatchSampler(Plain):
    def train_dataloader(self):
        sampler = _Buckets(SequentialSampler(range(64)), batch_size=16, drop_last=False)
        return DataLoader(classification_data(64), batch_sampler=sampler)


def test_a_batch_sampler_without_a_sample_rate_is_refused():
    record = RecordUpdate()
    with pytest.raises(RuntimeError, match=r"_Buckets.*sample_rate="):
        _fit(DPStrategy(), module=UserBatchSampler, callbacks=[record], max_epochs=1)
    assert not hasattr(record, "batch")


def test_a_batch_sampler_with_a_sample_rate_is_replaced_with_a_warning():
    strategy = DPStrategy(sample_rate=0.25)
    with pytest.warns(UserWarning, match="replaces the train loader's _Buckets by Poisson sampling"):
        _, trainer = _fit(strategy, module=UserBatchSampler, max_epochs=1)
    assert trainer.global_step == 4 and strategy.optimizers[0].expected_batch_size == 16.0


def test_a_weighted_sampler_is_replaced_with_a_warning():
    class Weighted(Plain):
        def train_dataloader(self):
            sampler = WeightedRandomSampler(torch.rand(64), num_samples=64)
            return DataLoader(classification_data(64), batch_size=16, sampler=sampler)

    with pytest.warns(UserWarning, match="replaces the train loader's WeightedRandomSampler"):
        _fit(DPStrategy(), module=Weighted, max_steps=1)


def test_the_default_samplers_are_replaced_silently():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(DPStrategy(), max_steps=1)
    assert not [w for w in caught if "replaces the train loader" in str(w.message)]


# -- item 9: a module trained privately before -------------------------------------------------------------------


def test_training_a_privately_trained_module_again_warns_about_the_fresh_ledger():
    module, _ = _fit(DPStrategy(), max_steps=2)
    trainer = tiny_trainer(None, strategy=DPStrategy(), max_steps=2, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match=r"already trained privately .* fresh privacy ledger"):
        trainer.fit(module)


# -- item 10: target_epsilon with limit_train_batches -------------------------------------------------------------


def test_target_epsilon_plans_from_the_steps_that_really_run():
    strategy = DPStrategy(target_epsilon=3.0, accountant="rdp")
    _, trainer = _fit(strategy, max_epochs=3, limit_train_batches=2)
    assert trainer.global_step == 6
    assert 2.9 < strategy.epsilon <= 3.0


def test_target_epsilon_plans_from_max_steps_when_it_ends_the_run_first():
    strategy = DPStrategy(target_epsilon=3.0, accountant="rdp")
    _, trainer = _fit(strategy, max_epochs=1, max_steps=40)
    assert trainer.global_step == 4
    assert 2.9 < strategy.epsilon <= 3.0


# -- issue 10.11: unused parameters ------------------------------------------------------------------------------


class WithUnused(Plain):
    def __init__(self):
        super().__init__(num_samples=64, batch_size=16)
        self.unused = nn.Linear(8, 3)  # registered, never called


@pytest.mark.parametrize(("mode", "module"), [("hooks", WithUnused), ("ghost", None)])
def test_an_unused_parameter_has_a_zero_gradient(mode, module):
    from tests.privacy.test_strategy import PerExample

    class GhostWithUnused(PerExample):
        def __init__(self):
            super().__init__(num_samples=64, batch_size=16)
            self.unused = nn.Linear(8, 3)

    record = RecordUpdate()
    strategy = _quiet(noise_multiplier=0.0, grad_sample_mode=mode)
    _, trainer = _fit(strategy, module=module or GhostWithUnused, callbacks=[record], max_steps=2)
    assert trainer.global_step == 2
    assert record.update["unused.weight"].abs().max() == 0  # noise 0: the update of a zero gradient is zero
    assert record.update["net.0.weight"].abs().max() > 0


def test_an_unused_parameter_goes_through_physical_parts_after_a_noisy_step():
    """With ``max_physical_batch_size``, the earlier parts run inside ``training_step``, before Lightning zeroes the
    gradients: the last step's noisy gradient of the unused layer was still there, taken for a gradient without
    per-example gradients (activation checkpointing), and the second step was refused."""
    strategy = _quiet(noise_multiplier=1.0, max_physical_batch_size=5, seed=7)
    _, trainer = _fit(strategy, module=WithUnused, max_steps=3)
    assert trainer.global_step == 3


# -- issue 10.17: unsupported optimizers and SubspaceTraining ---------------------------------------------------


def test_lbfgs_is_refused_naming_the_optimizer():
    class WithLBFGS(Plain):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(RuntimeError, match="LBFGS can't run under DP-SGD"):
        _fit(DPStrategy(), module=WithLBFGS, max_steps=1)


def test_subspace_training_is_refused_as_not_supported():
    from lightning_nt.compression import SubspaceTraining

    with pytest.raises(RuntimeError, match="SubspaceTraining is not supported under DP"):
        _fit(DPStrategy(), callbacks=[SubspaceTraining(dimension=10)], max_steps=1)


@pytest.mark.parametrize("mode", ["hooks", "bk", "auto"])
@pytest.mark.parametrize("hook", [nn.utils.weight_norm, nn.utils.spectral_norm], ids=["weight_norm", "spectral_norm"])
def test_an_old_style_weight_norm_hook_is_refused_before_the_first_step(mode, hook):
    # the layer's weight is recomputed from weight_g/weight_v (weight_orig) by a forward pre-hook: hooks crashed
    # inside Opacus, bk and auto trained those parameters on noise alone (their per-example gradients were zero)
    def module():
        plain = Plain(num_samples=64, batch_size=16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated, and still common
            hook(plain.net[0])
        return plain

    with pytest.raises(RuntimeError, match=r"\['net.0'\] are parametrized .*remove_weight_norm") as raised:
        _fit(_quiet(grad_sample_mode=mode), module=module, max_steps=1)
    assert "training_step" not in "".join(traceback.format_tb(raised.tb))  # refused before any step


class Checkpointed(Plain):
    """The hidden layer under activation checkpointing, which re-runs it in the backward pass."""

    def __init__(self):
        super().__init__(num_samples=64, batch_size=16)

    def forward(self, inputs):
        return self.net[3](torch.utils.checkpoint.checkpoint(self.net[:3], inputs, use_reentrant=False))


@pytest.mark.parametrize(("mode", "message"), [("hooks", "got a gradient but no per-example"), ("bk", "checkpoint")])
def test_activation_checkpointing_is_refused_before_the_first_update(mode, message):
    # hooks: the re-run layer had no per-example gradient, was taken for unused, and was silently not trained
    with pytest.raises(RuntimeError, match=message) as raised:
        _fit(_quiet(grad_sample_mode=mode, noise_multiplier=0.0), module=Checkpointed, max_steps=2)
    assert "activation checkpointing" in str(raised.value) and "net.0" in str(raised.value)


class FunctionalUse(Plain):
    """The first layer's weight also used functionally (as GPT-2 ties its output layer: ``h @ wte.weight.T``)."""

    def __init__(self):
        super().__init__(num_samples=64, batch_size=16)

    def forward(self, inputs):
        logits = self.net(inputs)
        shift = torch.nn.functional.linear(inputs, self.net[0].weight).mean(1, keepdim=True)
        return torch.cat([logits[:, :1] + shift, logits[:, 1:]], dim=1)  # one class only: softmax sees the shift


class UncalledLayer(Plain):
    """A layer never called: its weight is used by ``F.linear``."""

    def __init__(self):
        super().__init__(num_samples=64, batch_size=16)
        self.extra = nn.Linear(8, 3)

    def forward(self, inputs):
        return self.net(inputs) + torch.nn.functional.linear(inputs, self.extra.weight)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
@pytest.mark.parametrize(("module", "named"), [(FunctionalUse, "net.0.weight"), (UncalledLayer, "extra.weight")])
def test_a_parameter_used_outside_its_layer_is_refused_before_the_first_update(mode, module, named):
    # the engines saw only the layer's own call: DP-SGD trained on part of the gradient (FunctionalUse) or none
    with pytest.raises(RuntimeError, match=rf"{named}.* used outside a call of its own layer"):
        _fit(_quiet(grad_sample_mode=mode, noise_multiplier=0.0), module=module, max_steps=2)


def test_a_float64_run_is_refused_with_its_own_reason():
    # it was refused for the fp16 GradScaler, which a float64 run doesn't have
    with pytest.raises(RuntimeError, match=r"precision='64-true': .* in fp32") as raised:
        _fit(_quiet(), max_steps=1, precision="64-true")
    assert "GradScaler" not in str(raised.value)


# -- the capability declaration: privacy imports no other capability -----------------------------------------------


def test_a_callback_that_declares_it_reads_training_data_is_refused():
    class Probe(pl.Callback):
        reads_training_data_outside_step = True

    with pytest.raises(RuntimeError, match="Probe compute"):
        _fit(DPStrategy(), callbacks=[Probe()], max_steps=1)


@pytest.mark.parametrize(
    "monitor",
    [
        lambda: RepresentationSimilarity(num_examples=16),
        lambda: LazinessMonitor(num_examples=8),
        lambda: GradientSignalTest(num_examples=16, data="train"),
    ],
    ids=["RepresentationSimilarity", "LazinessMonitor", "GradientSignalTest-train"],
)
def test_every_monitor_that_reads_training_data_is_refused_before_any_step(monitor):
    # they logged un-noised figures of the private training examples (CKA, NTK, gradient statistics) silently
    callback, record = monitor(), RecordUpdate()
    with pytest.raises(RuntimeError, match=f"{type(callback).__name__} compute"):
        _fit(DPStrategy(), callbacks=[callback, record], max_steps=1)
    assert not hasattr(record, "batch")


def test_a_gradient_signal_test_on_held_out_data_runs_under_dp():
    callback = GradientSignalTest(num_examples=16, every_n_steps=1, data="val")
    _fit(DPStrategy(), callbacks=[callback], max_steps=2)
    assert callback.history


def test_a_gradient_accumulation_schedule_is_refused_before_any_step():
    # it turned accumulation on at its epoch: two Poisson batches per noisy step, accounted as one (silently)
    record = RecordUpdate()
    with pytest.raises(RuntimeError, match=r"GradientAccumulationScheduler.*accounting"):
        _fit(DPStrategy(), callbacks=[GradientAccumulationScheduler({1: 2}), record], max_epochs=2)
    assert not hasattr(record, "batch")


def test_accumulation_turned_on_mid_run_is_refused_before_the_next_step():
    class AccumulateFromEpochOne(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.accumulate_grad_batches = 2

    pl.seed_everything(0)
    trainer = tiny_trainer(None, strategy=DPStrategy(), callbacks=[AccumulateFromEpochOne()], max_epochs=2)
    with pytest.raises(RuntimeError, match="accumulate_grad_batches=2 breaks Poisson sampling"):
        trainer.fit(Plain(num_samples=64, batch_size=16))
    assert trainer.global_step == trainer.num_training_batches  # the first epoch's steps, none accumulated


def test_a_finetuning_schedule_is_refused_before_any_step():
    # BackboneFinetuning unfroze parameters mid-run, refused only then (after noisy steps had been released)
    class Backbone(Plain):
        def __init__(self):
            super().__init__(num_samples=64, batch_size=16)
            self.backbone = self.net[0]

    record = RecordUpdate()
    with pytest.raises(RuntimeError, match="BackboneFinetuning changes which parameters train"):
        _fit(DPStrategy(), module=Backbone, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), record])
    assert not hasattr(record, "batch")


def test_privacy_imports_no_other_capability():
    others = ("gradinit", "sharpness", "compression", "averaging")
    for path in Path(lightning_nt.privacy.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            assert not any(n.startswith(f"lightning_nt.{o}") for n in names for o in others), (path.name, names)


# -- item 9: hand-written coupling and the opt-in sensitivity probe ----------------------------------------------


class Centred(Plain):
    """Couples the examples by hand: each input is centred on the batch mean (undetectable by module checks)."""

    def forward(self, inputs):
        return super().forward(inputs - inputs.mean(0))


def test_the_sensitivity_probe_finds_hand_written_coupling_before_the_first_step():
    record = RecordUpdate()
    with pytest.raises(RuntimeError, match="sensitivity_probe: one example moved the clipped gradient sum"):
        strategy = _quiet(sensitivity_probe=True, max_grad_norm=0.1, seed=7)  # deterministic batches
        _fit(strategy, module=Centred, callbacks=[record], max_steps=1)
    assert not hasattr(record, "update")
    with pytest.raises(RuntimeError, match="mixes the examples of the batch"):  # without the probe: refused too,
        _fit(DPStrategy(max_grad_norm=0.1), module=Centred, max_steps=1)  # by the first step's independence check


@pytest.mark.parametrize("kwargs", [{}, {"max_physical_batch_size": 5}])
def test_the_sensitivity_probe_passes_a_per_example_module_and_changes_nothing(kwargs):
    updates = []
    for probe in (False, True):
        record = RecordUpdate()
        strategy = _quiet(noise_multiplier=0.0, sensitivity_probe=probe, seed=7, **kwargs)  # the same batches
        _fit(strategy, callbacks=[record], max_steps=1)
        updates.append(record.update)
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=0, atol=0)


class RecordsAutocast(Plain):
    """Notes whether autocast is on in every ``training_step`` call (the step's, the probe's and the check's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.net.autocast = []  # on a submodule: the probe's own runs put the module's own attributes back

    def training_step(self, batch, batch_idx):
        self.net.autocast.append(torch.is_autocast_enabled("cpu"))
        return super().training_step(batch, batch_idx)


def test_the_sensitivity_probe_runs_in_the_runs_precision():
    """Before: the probe's steps ran outside the precision plugin's context, in fp32 under bf16-mixed."""
    module = RecordsAutocast(num_samples=64, batch_size=16)
    strategy = _quiet(noise_multiplier=0.0, sensitivity_probe=True, seed=7)
    _fit(strategy, module=lambda: module, max_steps=1, precision="bf16-mixed")
    assert len(module.net.autocast) > 1 and all(module.net.autocast)


class ShiftsItsLabelsInPlace(Plain):
    """Changes its batch's integer labels in place (as MLM masking ``ids[mask] = MASK`` does)."""

    def training_step(self, batch, batch_idx):
        batch[1].add_(1).remainder_(3)
        return super().training_step(batch, batch_idx)


def test_the_sensitivity_probe_leaves_a_step_that_changes_its_batch_in_place_as_it_was():
    """Before: the probe handed the step's own integer tensors to its passes, so the first step saw its labels
    shifted three times instead of once."""
    updates = []
    for probe in (False, True):
        record = RecordUpdate()
        strategy = _quiet(noise_multiplier=0.0, sensitivity_probe=probe, seed=7)
        _fit(
            strategy,
            module=lambda: ShiftsItsLabelsInPlace(num_samples=64, batch_size=16),
            callbacks=[record],
            max_steps=1,
        )
        updates.append(record.update)
    for name in updates[0]:
        torch.testing.assert_close(updates[1][name], updates[0][name], rtol=0, atol=0)


def test_the_sensitivity_probe_waits_for_a_batch_of_two_examples():
    calls = []  # (batch size, holds the probe's canary) of every training_step call

    class Watched(Plain):
        def training_step(self, batch, batch_idx):
            calls.append((len(batch[0]), bool(batch[0].abs().max() > 50)))  # the canary is scaled by 100
            return super().training_step(batch, batch_idx)

    strategy = _quiet(sensitivity_probe=True, seed=7)  # q = 1/64: most batches hold 0 or 1 example
    _fit(strategy, module=lambda: Watched(num_samples=64, batch_size=1), max_epochs=3)
    probes = [i for i, (_, canary) in enumerate(calls) if canary]
    assert len(probes) == 1 and calls[probes[0]][0] >= 2  # once, on the first batch of two examples
    assert all(size == 1 for size, _ in calls[: probes[0]])


def test_the_sensitivity_probe_needs_per_example_gradients():
    with pytest.raises(ValueError, match="sensitivity_probe"):
        DPStrategy(sensitivity_probe=True, grad_sample_mode="ghost")


# -- the user's own logging from the private batch ------------------------------------------------------------------


def test_logging_from_the_private_batch_is_flagged_once_as_not_covered():
    with pytest.warns(UserWarning, match=r"training_step logs \['train_acc', 'train_loss'\].*NOT covered") as caught:
        _fit(DPStrategy(), max_steps=3)  # TinyClassifier logs train_loss in training_step
    assert sum("training_step logs" in str(w.message) for w in caught) == 1
    from tests.privacy.canary import Audited

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(DPStrategy(), module=Audited, max_steps=1)
    assert not [w for w in caught if "training_step logs" in str(w.message)]


def test_testing_a_checkpoint_after_fit_keeps_the_whole_runs_ledger(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1)
    strategy = DPStrategy(accountant="rdp")
    module, trainer = _fit(strategy, callbacks=[checkpoint], max_epochs=2, enable_checkpointing=True)
    spent = strategy.epsilon
    trainer.test(module, ckpt_path=str(tmp_path / "epoch=0-step=4.ckpt"), verbose=False)
    assert strategy.epsilon == spent  # the earlier checkpoint's ledger does not replace the run's


class BroadcastPositions(Plain):
    """HuggingFace's position embeddings: indexed by ``arange(T)[None]`` (one row) and broadcast over the batch."""

    def __init__(self, freeze: bool = False):
        super().__init__(num_samples=64, batch_size=16)
        self.positions = nn.Embedding(2, 4)
        self.positions.requires_grad_(not freeze)

    def forward(self, inputs):
        sequence = inputs.view(len(inputs), 2, 4) + self.positions(torch.arange(2)[None])
        return self.net(sequence.flatten(1))


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_a_layer_run_on_one_row_shared_by_the_batch_is_refused_naming_the_two_fixes(mode):
    with pytest.raises(RuntimeError, match=r"positions ran on one row shared by the whole batch") as raised:
        _fit(_quiet(grad_sample_mode=mode, noise_multiplier=0.0), module=BroadcastPositions, max_steps=1)
    assert "positions.requires_grad_(False)" in str(raised.value) and "expand(B, T)" in str(raised.value)
    _fit(_quiet(grad_sample_mode=mode), module=lambda: BroadcastPositions(freeze=True), max_steps=1)  # the first fix


class AliasedHead(Plain):
    """The output layer's weight registered again on the network and used there: ``F.linear(h, self.out)``."""

    def __init__(self):
        super().__init__(num_samples=64, batch_size=16)
        self.out = self.net[3].weight

    def forward(self, inputs):
        return nn.functional.linear(self.net[:3](inputs), self.out, self.net[3].bias)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "functorch"])
def test_a_parameter_registered_again_on_the_module_holding_its_layer_is_refused_before_the_first_step(mode):
    # hooks, ghost and functorch crashed in the first backward ("... not on the expected device meta!")
    with pytest.raises(RuntimeError, match=r"\['out \(= net\.3\.weight\)'\] are registered again"):
        _fit(_quiet(grad_sample_mode=mode, noise_multiplier=0.0), module=AliasedHead, max_steps=1)
