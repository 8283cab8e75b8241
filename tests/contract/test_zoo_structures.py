"""What the module structures of the zoo's third sweep (``tests/helpers/zoo.py``: a bare ``nn.Parameter``, parameter
containers, PReLU/LayerNorm, a frozen BatchNorm backbone in eval mode, two losses, dropout, buffers) showed beyond the
shared promises of ``test_contract.py``. Each test either failed before its fix, or is an independent reference for
what the suite's promises can't judge (DP-SGD's clipped sums on the structures it trains, against ``vmap(grad)``;
IterateAveraging's BatchNorm recomputation leaving the raw run alone), or checks that the suite sees what it promises
to (the dropout entry's masks follow the global RNG, so a monitor's stray draw shows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_nt import DPStrategy, IterateAveraging, RepresentationSimilarity
from lightning_nt.gradinit.core import search_mode
from tests.contract.capabilities import Capability
from tests.contract.test_contract import assert_same_metrics, assert_same_weights, fit
from tests.helpers.engines import noiseless_update
from tests.helpers.trainer import tiny_trainer
from tests.helpers.zoo import DIM, HIDDEN, LENGTH, VOCAB, ZOO, EvalModeBatchNorm, ZooModule, _Buffered


class _DrawsFromTheGlobalRNG(pl.Callback):
    """A monitor with a bug: one draw from torch's global generator after every training batch."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        torch.rand(())


def test_the_dropout_entry_shows_a_monitor_that_draws_from_the_global_rng(tmp_path: Path) -> None:
    """The no-side-effects promise covers the dropout RNG: one stray draw per batch changes the trained weights, and
    a run without it is bit for bit the baseline (the entry's masks are deterministic)."""
    entry = ZOO["dropout"]
    baseline = fit(None, entry, tmp_path / "baseline")
    again = fit(None, entry, tmp_path / "again")
    drawing = fit(Capability("draws", lambda entry: _DrawsFromTheGlobalRNG()), entry, tmp_path / "drawing")
    assert baseline.error is None and again.error is None and drawing.error is None
    assert_same_weights(again.module, baseline.module)
    with pytest.raises(AssertionError, match="not bit for bit equal"):
        assert_same_weights(drawing.module, baseline.module)


class _ReadsTheLossUnmuted(pl.Callback):
    """A monitor with a bug: it reads the loss by calling ``training_step`` on another batch without muting
    ``self.log`` (under no_grad, so the weights are not touched)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        inputs, labels = next(iter(pl_module.val_dataloader()))
        with torch.no_grad():
            pl_module.training_step((inputs, labels), 0)


def test_the_two_losses_entry_shows_a_monitor_that_logs_from_training_step(tmp_path: Path) -> None:
    """The no-side-effects promise covers the module's own metrics: a loss read from ``training_step`` with
    ``self.log`` live overwrites ``train_ce`` and ``train_aux``, though the weights are unchanged."""
    entry = ZOO["two_losses"]
    baseline = fit(None, entry, tmp_path / "baseline")
    logging = fit(Capability("logs", lambda entry: _ReadsTheLossUnmuted()), entry, tmp_path / "logging")
    assert baseline.error is None and logging.error is None
    assert_same_weights(logging.module, baseline.module)
    with pytest.raises(AssertionError, match=r"own metrics differ: \['train_ce', 'train_aux'\]"):
        assert_same_metrics(logging.trainer, baseline.trainer)


def test_iterate_averaging_keeps_the_statistics_of_a_batchnorm_kept_in_eval_mode(tmp_path: Path) -> None:
    """bn="recompute" recomputes the statistics of the BatchNorms that train in training mode only: a frozen backbone
    kept in eval mode keeps its (pre-trained) running statistics in the average, in validation and after fit."""
    torch.manual_seed(0)
    module = EvalModeBatchNorm()
    norm = module.net[0][1]
    pretrained = {name: buffer.clone() for name, buffer in norm.named_buffers()}
    averaging = IterateAveraging(mode="uniform", bn="recompute", apply_on_end=True)
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[averaging]).fit(module)
    assert averaging.n_averaged == 8
    for name, value in pretrained.items():  # the module holds the average (and its statistics) after fit
        assert torch.equal(getattr(norm, name), value), name


class _BatchNormTrainsInTrainMode(EvalModeBatchNorm):
    """The same frozen backbone, left in training mode (its BatchNorm normalises by the batch's statistics)."""

    def on_train_epoch_start(self) -> None:
        pass


def test_dp_refuses_a_frozen_batchnorm_left_in_training_mode(tmp_path: Path) -> None:
    """A frozen BatchNorm passes the module check (it has nothing to clip), and is refused before the first step
    when it runs in training mode, where batch statistics couple the examples."""
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    with pytest.raises(RuntimeError, match=r"BatchNorm \['net\.0\.1'\] is in training mode.*eval\(\)"):
        trainer.fit(_BatchNormTrainsInTrainMode())
    assert trainer.global_step == 0


class _BatchNormWithoutRunningStatistics(EvalModeBatchNorm):
    """The frozen backbone in eval mode, but its BatchNorm keeps no running statistics: it normalises by the batch's."""

    def network(self) -> nn.Module:
        network = super().network()
        network[0][1] = nn.BatchNorm1d(HIDDEN, track_running_stats=False).requires_grad_(False)
        return network


def test_dp_refuses_a_frozen_batchnorm_without_running_statistics_even_in_eval_mode(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    with pytest.raises(RuntimeError, match=r"BatchNorm \['net\.0\.1'\] .*track_running_stats=False"):
        trainer.fit(_BatchNormWithoutRunningStatistics())
    assert trainer.global_step == 0


def _reference_update(
    module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], float]:
    """Per-example gradients of the trainable parameters by ``vmap(grad)``, clipped to a bound between the smallest
    and the largest norm (some examples clipped, some not), summed, over the batch size; and that bound."""
    trainable = {name: p.detach() for name, p in module.named_parameters() if p.requires_grad}
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, {**state, **params}, (x[None],)), y[None])

    samples = vmap(grad(loss), in_dims=(None, 0, 0))(trainable, inputs, labels)
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples.values()], dim=1).norm(dim=1)
    clip = float(norms.median())
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {name: torch.einsum("b,b...->...", factors, g) / len(inputs) for name, g in samples.items()}, clip


def test_dp_fix_modules_keeps_a_frozen_batchnorm_backbone(tmp_path: Path) -> None:
    """``fix_modules=True`` swaps what DP-SGD can't train (a trainable BatchNorm) and keeps a frozen one in eval mode,
    with its pre-training's running statistics (a fresh GroupNorm would throw the backbone's normalisation away)."""
    torch.manual_seed(0)
    module = ZOO["eval_mode_batchnorm"].build()
    norm = module.net[0][1]
    pretrained = norm.running_mean.clone()
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, fix_modules=True)
    trainer = tiny_trainer(tmp_path, strategy=strategy)
    trainer.fit(module)
    assert trainer.global_step == 4 and module.net[0][1] is norm and torch.equal(norm.running_mean, pretrained)


@pytest.mark.parametrize(
    ("entry", "mode"),
    [
        ("eval_mode_batchnorm", "hooks"),
        ("eval_mode_batchnorm", "bk"),
        ("bare_parameter", "hooks"),  # the LightningModule's own parameter: a per-example rule for the root module
        ("prelu_layernorm", "hooks"),  # PReLU has no Opacus rule (functorch), LayerNorm has one
        ("gpt_style", "hooks"),  # transformers' Conv1D (functorch) and causal attention; position embeddings frozen
    ],
)
def test_dp_clips_the_structures_it_trains_exactly(entry: str, mode: str) -> None:
    """Entries DP-SGD trains: each example's clipped gradient is that of ``vmap(grad)`` (a frozen backbone in eval
    mode gives each example its own features), so the engine's clipped sum equals the reference in float64."""
    torch.manual_seed(0)
    module = ZOO[entry].build().double().train()
    module.on_train_epoch_start()  # the frozen backbone to eval mode, as in training
    generator = torch.Generator().manual_seed(1)
    if entry == "gpt_style":  # the fix DP-SGD's refusal names: position embeddings shared by the batch, frozen
        module.net.wpe.requires_grad_(False)
        inputs = torch.randint(VOCAB, (12, LENGTH), generator=generator)
    else:
        inputs = torch.randn(12, 8, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 4, 12)[:, None]
    labels = torch.randint(3, (12,), generator=generator)
    assert_the_update_is_the_clipped_sum(mode, module, inputs, labels)


def assert_the_update_is_the_clipped_sum(mode: str, module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
    """One noiseless private step under ``mode`` moves every trainable parameter by minus the ``vmap(grad)``
    clip-and-sum of the batch (float64), with the clip between the examples' gradient norms."""
    expected, clip = _reference_update(module, inputs, labels)
    update = noiseless_update(mode, module, inputs, labels, clip)
    assert update.keys() == expected.keys()
    for name, value in update.items():
        torch.testing.assert_close(-value, expected[name], rtol=1e-5, atol=1e-7)


def test_representation_similarity_compares_prelu_layers(tmp_path: Path) -> None:
    """PReLU (an activation with a learned slope) is found by type with ``layers=None``, like LeakyReLU."""
    torch.manual_seed(0)
    callback = RepresentationSimilarity(every_n_epochs=1, num_examples=16, chunk_size=8)
    trainer = tiny_trainer(tmp_path, callbacks=[callback])
    trainer.fit(ZOO["prelu_layernorm"].build())
    assert {"similarity/cka/net.2", "similarity/cka/net.4", "similarity/cka/net.6"} <= set(trainer.callback_metrics)


def test_dp_refuses_parameter_containers_by_name_before_the_first_step(tmp_path: Path) -> None:
    """Trainable parameters in an nn.ParameterList/ParameterDict (never called: no engine sees their uses) are
    refused naming the containers and the fix, not by the example-independence check's "examples left out"."""
    torch.manual_seed(0)
    trainer = tiny_trainer(tmp_path, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    with pytest.raises(RuntimeError, match=r"\['net\.weights', 'net\.biases'\].*nn\.ParameterList.*nn\.Linear"):
        trainer.fit(ZOO["parameter_containers"].build())
    assert trainer.global_step == 0


class _BackboneEvalInTrain(EvalModeBatchNorm):
    """The other way fine-tuning code keeps a backbone in eval mode: ``train()`` overridden (so it already holds when
    training starts)."""

    def on_train_epoch_start(self) -> None:
        pass

    def train(self, mode: bool = True) -> _BackboneEvalInTrain:
        super().train(mode)
        self.net[0].eval()
        return self


def test_gradinit_searches_with_a_batchnorm_kept_in_eval_mode_on_its_running_statistics() -> None:
    """GradInit's search puts the BatchNorms that train in training mode on batch statistics (as the first steps see
    them), and leaves one the user keeps in eval mode on its running statistics: the look-ahead loss it starts from is
    the loss the module has in training, not that of another function."""
    torch.manual_seed(0)
    module = _BackboneEvalInTrain().train()
    inputs, labels = next(iter(module.train_dataloader()))
    expected = F.cross_entropy(module(inputs), labels).item()
    with search_mode(module):
        assert not module.net[0][1].training
        searched = F.cross_entropy(module(inputs), labels).item()
    assert searched == expected
    assert not module.net[0].training and module.net[1].training  # modes restored


class _BatchNormDropoutCounter(ZooModule):
    """BatchNorm (recomputed for the average), dropout drawing from the global RNG (not reseeded), and a step counter
    and a running mean that the training forward pass updates (the ``buffers`` entry's)."""

    def network(self) -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(DIM), _Buffered(), nn.Dropout(0.5))


def test_iterate_averaging_recomputes_batchnorm_without_touching_the_run(tmp_path: Path) -> None:
    """The forward passes that recompute BatchNorm statistics for the evaluated average change nothing else: the
    module's other buffers (a step counter, a running mean) and the global RNG (dropout masks) are as they were, so
    the raw run is bit for bit the run without IterateAveraging, and the counter counts training steps only; also
    in the average copied into the module when training ends (the recomputation at the end advanced the counter)."""

    def run(callbacks: list[pl.Callback], root: Path) -> pl.LightningModule:
        torch.manual_seed(0)
        module = _BatchNormDropoutCounter()
        tiny_trainer(root, max_epochs=2, callbacks=callbacks).fit(module)
        return module

    baseline = run([], tmp_path / "baseline")
    averaged = run([IterateAveraging(mode="uniform", bn="recompute", apply_on_end=False)], tmp_path / "averaged")
    assert int(averaged.net[1].steps) == int(baseline.net[1].steps) == 8
    assert_same_weights(averaged, baseline)
    applied = run([IterateAveraging(mode="uniform", bn="recompute", apply_on_end=True)], tmp_path / "applied")
    assert int(applied.net[1].steps) == 8
    assert torch.equal(applied.net[1].feature_mean, baseline.net[1].feature_mean)
