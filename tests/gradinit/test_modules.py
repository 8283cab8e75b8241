"""GradInit on module shapes written elsewhere: shared blocks, tied weights, subspaces, unused parameters, schedules."""

import logging
import math

import pytest
import pytorch_lightning as pl
import torch

from lightning_nt import GradInit, SubspaceTraining
from lightning_nt.compression import find_subspace
from tests.gradinit.models import (
    ParamGroupsClassifier,
    SharedBlockClassifier,
    TiedLanguageModel,
    UnusedParameterClassifier,
    WarmupClassifier,
    ZeroLearningRateClassifier,
)
from tests.helpers import TinyClassifier, tiny_trainer


class Identities(pl.Callback):
    """After GradInit: the optimizer's parameters are the module's, in every place each one is registered."""

    def on_train_start(self, trainer, pl_module):
        registered = [p for m in pl_module.modules() for p in m._parameters.values() if p is not None]
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.every_slot_holds_a_parameter = all(type(p) is torch.nn.Parameter for p in registered)
        self.every_slot_is_held = {id(p) for p in registered if p.requires_grad} <= held
        self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _fit(module, gradinit, *callbacks, **kwargs):
    pl.seed_everything(0)
    identities = Identities()
    trainer = tiny_trainer(None, callbacks=[gradinit, identities, *callbacks], **kwargs)
    initial = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer.fit(module)
    return trainer, identities, initial


def test_a_shared_block_keeps_its_parameters_and_trains():
    module = SharedBlockClassifier(num_samples=64)
    gradinit = GradInit(iterations=6, lr=0.05)
    trainer, identities, initial = _fit(module, gradinit, max_epochs=2)
    assert module.first is module.second and module.net[2] is module.first
    assert identities.every_slot_holds_a_parameter and identities.every_slot_is_held
    assert list(gradinit.scales) == [
        "net.0.weight",
        "net.0.bias",
        "net.2.0.weight",
        "net.2.0.bias",
        "net.4.weight",
        "net.4.bias",
    ]
    block = "net.2.0.weight"  # the shared block's weight: one scale, applied once
    torch.testing.assert_close(identities.weights[block], initial[block] * gradinit.scales[block])
    assert trainer.global_step == 8 and math.isfinite(float(trainer.callback_metrics["train_loss"]))
    assert not torch.equal(module.first[0].weight, identities.weights[block])  # it trained


def test_tied_embedding_and_output_layer_keep_one_parameter_and_train():
    module = TiedLanguageModel()
    gradinit = GradInit(iterations=6, lr=0.05)
    trainer, identities, initial = _fit(module, gradinit, max_epochs=2)
    assert module.output.weight is module.embedding.weight
    assert identities.every_slot_holds_a_parameter and identities.every_slot_is_held
    assert sorted(gradinit.scales) == ["embedding.weight", "hidden.bias", "hidden.weight", "output.bias"]
    scale = gradinit.scales["embedding.weight"]
    assert scale != 1.0
    torch.testing.assert_close(identities.weights["embedding.weight"], initial["embedding.weight"] * scale)
    assert trainer.global_step == 8
    assert not torch.equal(module.embedding.weight, identities.weights["embedding.weight"])


def test_a_subspace_model_survives():
    module = TinyClassifier(num_samples=64)
    pl.seed_everything(0)
    identities = Identities()
    trainer = tiny_trainer(None, callbacks=[SubspaceTraining(dimension=12), GradInit(iterations=4), identities])
    trainer.fit(module)
    subspace = find_subspace(module)
    assert identities.every_slot_holds_a_parameter and identities.every_slot_is_held
    assert any(p is subspace.weight for p in trainer.optimizers[0].param_groups[0]["params"])
    assert trainer.global_step == 4 and subspace.weight.abs().sum() > 0  # w moved: the subspace trained


def test_a_subspace_model_has_nothing_to_scale_and_says_so():
    """Its only trainable tensor is the subspace coordinates, zero at the start: the search used to run and leave
    every scale at 1 silently (the user believed the initialisation searched)."""
    module = TinyClassifier(num_samples=64)
    pl.seed_everything(0)
    gradinit = GradInit(iterations=4)
    trainer = tiny_trainer(None, callbacks=[SubspaceTraining(dimension=12), gradinit])
    with pytest.warns(UserWarning, match=r"GradInit has nothing to scale: every trainable parameter is zero"):
        trainer.fit(module)
    assert gradinit.result is None and gradinit.scales == {}
    assert trainer.global_step == 4 and find_subspace(module).weight.abs().sum() > 0


def test_an_unused_parameter_keeps_scale_one_and_is_reported(caplog):
    module = UnusedParameterClassifier(num_samples=64)
    gradinit = GradInit(iterations=6, lr=0.05)
    with caplog.at_level(logging.INFO):
        _fit(module, gradinit, max_steps=1)
    assert gradinit.scales["unused_head.weight"] == 1.0 and gradinit.scales["unused_head.bias"] == 1.0
    assert gradinit.result.unused == ["unused_head.weight", "unused_head.bias"]
    assert any(abs(s - 1) > 1e-3 for s in gradinit.scales.values())
    said = [r for r in caplog.records if "keep scale 1: ['unused_head.weight', 'unused_head.bias']" in r.getMessage()]
    assert len(said) == 1


def test_a_warmup_from_zero_simulates_the_schedules_base_learning_rate():
    gradinit = GradInit(iterations=6, lr=0.05)
    trainer, _, _ = _fit(WarmupClassifier(num_samples=64), gradinit, max_steps=1)
    assert gradinit._simulated_optimizer(trainer.optimizers[0]) == ("sgd", 0.1)  # lr is 0 at step 0
    assert not gradinit.result.diverged and math.isfinite(gradinit.result.lookahead_loss_end)


def test_a_zero_learning_rate_without_a_base_asks_for_eta_naming_the_schedule():
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau.*`eta=`"):
        _fit(ZeroLearningRateClassifier(num_samples=64), GradInit(iterations=2), max_steps=1)
    _fit(ZeroLearningRateClassifier(num_samples=64), gradinit := GradInit(iterations=2, eta=0.1), max_steps=1)
    assert gradinit.scales


def test_param_groups_with_different_learning_rates_warn():
    with pytest.warns(UserWarning, match=r"different learning rates \[0.01, 0.1\].*`eta=`"):
        _fit(ParamGroupsClassifier(num_samples=64), GradInit(iterations=2), max_steps=1)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_on_the_cpu(precision):
    """The search runs in fp32; under bf16-true the substituted weights are cast to the module's dtype."""
    module = SharedBlockClassifier(num_samples=64)
    gradinit = GradInit(iterations=4, lr=0.05)
    trainer, identities, _ = _fit(module, gradinit, precision=precision, max_steps=2)
    assert identities.every_slot_holds_a_parameter and identities.every_slot_is_held
    assert all(math.isfinite(s) for s in gradinit.scales.values()) and trainer.global_step == 2
    assert math.isfinite(gradinit.result.lookahead_loss_end)
