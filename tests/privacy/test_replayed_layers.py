"""Layers whose per-example gradients Opacus forms by re-running their forward pass under ``torch.func`` (every layer
under ``grad_sample_mode="functorch"``; a layer with trainable parameters of its own and no per-sample rule under the
other Opacus modes) are refused, by name and with the fix, where the re-run can't replay them (issue 10).

What the re-run can't replay: random draws (an ``nn.Dropout`` inside the layer, refused before anything runs; a
functional draw, ``F.dropout(x, p, training=self.training)``, named when the first backward pass meets it, where
torch said only "vmap: called random operation"), and inputs besides the first (the re-run sees the first positional
input alone: ``layer(x, scale)`` was silently clipped as ``layer(x)``; refused on every step, as a model may pass them
only on some batches). A dropout switched on after the engine was built is refused when the next step starts. Each
call is re-run as the layer was when it began, checked against it (``test_replay_reproduces_the_call.py``). Ghost
clipping, whose norms would come from the re-run but whose release comes from the real backward pass, refuses every
layer it would re-run. The exactness of what is replayed (``layer(x, None)``, a custom ``F.embedding_bag`` layer
with its weights computed inside) is in ``test_layer_matrix.py``.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.engines import NoPrecision, noiseless_engine
from tests.privacy import test_layer_matrix as layer_matrix
from tests.privacy.test_weighted_bags import ParametersAtFailure, _fit

REPLAYING_MODES = ["hooks", "functorch"]  # the engines that re-run layers with torch.func (ghost refuses them)


class DropoutBlock(nn.Module):
    """A layer scale over dropout: a Parameter of its own (no per-sample rule), a random module inside."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(x) * self.scale


class FunctionalDropout(nn.Module):
    """A layer scale with a functional dropout draw in its forward pass (no module to find up front)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, 0.5, training=self.training) * self.scale


class Scaled(layer_matrix.Scaled):
    """The layer matrix's custom layer with an optional second input, 4 outputs wide."""

    def __init__(self) -> None:
        super().__init__(outputs=4)


class WeightedBag(nn.Module):
    """A custom layer pooling its own table by ``F.embedding_bag``, with ``per_sample_weights`` given as an input."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 4) / 2)

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        tokens = (x.abs() * 3).long().clamp(max=9)
        return F.embedding_bag(tokens, self.weight, per_sample_weights=weights, mode="sum")


class Net(nn.Module):
    """``layer`` then a linear head; from the second step on, the layer also gets its input named ``other``
    (positionally, or by keyword)."""

    def __init__(self, layer: nn.Module, other: str | None = None, keyword: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(layer, nn.Linear(4, 3))
        self.other, self.keyword, self.steps = other, keyword, 0

    def forward(self, x: Tensor) -> Tensor:
        layer, head = self.net
        if self.other is None or not self.steps:
            out = layer(x)
        else:
            second = x.abs() + 0.5
            out = layer(x, **{self.other: second}) if self.keyword else layer(x, second)
        self.steps += 1
        return head(out)


def _step(mode: str, module: Net) -> None:
    """One noiseless private step of ``module`` (cross-entropy of 6 examples), through the engine of ``mode``."""
    generator = torch.Generator().manual_seed(1)
    inputs, labels = torch.randn(6, 4, generator=generator), torch.randint(3, (6,), generator=generator)
    engine = noiseless_engine(mode, module, 1.0, len(inputs))
    try:
        engine.start()
        engine.discard_per_example_state()
        output = engine.take_output(F.cross_entropy(module(inputs), labels))
        engine.backward(output, output.backward, len(inputs), NoPrecision())
        engine.optimizer.step()
        engine.stop()
        engine.forget()
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("mode", "refusal"),
    [
        (
            "hooks",
            r"Opacus recomputes their whole forward pass.*net\.0 \(DropoutBlock: \['scale'\]\) draws random "
            r"numbers while training in \['drop'\].*requires_grad_\(False\).*p=0",
        ),
        (
            "functorch",
            r"^grad_sample_mode='functorch' can't form per-example gradients of layers "
            r"\['net\.0 \(DropoutBlock\)'\].*draws random numbers while training in \['drop'\].*'hooks'.*p=0",
        ),
    ],
)
def test_a_random_layer_inside_a_replayed_layer_is_refused_by_name_before_anything_runs(mode, refusal):
    """One refusal for both modes, each with its own fix: under functorch, grad_sample_mode='hooks'."""
    torch.manual_seed(0)
    module = Net(DropoutBlock())
    with pytest.raises(RuntimeError, match=refusal):
        noiseless_engine(mode, module, 1.0, 6)
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in module.modules())


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_functional_random_draw_in_a_replayed_layer_is_named_in_the_first_backward(mode):
    """``F.dropout`` in a replayed layer's forward: torch's bare vmap error, chained under one naming the layer and
    the fixes, before the optimizer step (nothing released)."""
    torch.manual_seed(0)
    module = Net(FunctionalDropout())
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(
        RuntimeError,
        match=r"^Layer 'net\.0' \(FunctionalDropout\) draws random numbers in its "
        r"forward pass.*torch\.func.*Draw outside the layer.*p=0.*requires_grad_\(False\)",
    ) as refusal:
        _step(mode, module)
    assert "vmap: called random operation" in str(refusal.value.__cause__)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


@pytest.mark.parametrize("keyword", [False, True], ids=["positional", "keyword"])
@pytest.mark.parametrize(("layer", "other"), [(Scaled, "scale"), (WeightedBag, "weights")], ids=["scale", "bag"])
@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_another_input_of_a_replayed_layer_is_refused_on_a_later_step(mode, layer, other, keyword):
    """The re-run replays the first input alone: a second input (a scale; per_sample_weights of a custom
    ``F.embedding_bag`` layer) given from the second step on is refused on that step, before its forward pass."""
    torch.manual_seed(0)
    module = Net(layer(), other, keyword)
    _step(mode, module)  # the first step, one input: trains
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(
        RuntimeError,
        match=rf"^Layer 'net\.0' \({layer.__name__}\) was called with inputs \['{other}'\] that "
        r"Opacus can't replay.*torch\.func on its first positional input alone.*Refused before any noise",
    ):
        _step(mode, module)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_inputs_at_their_defaults_and_calls_outside_the_step_pass(mode):
    """``layer(x, None)`` is ``layer(x)`` for the re-run; a second input between steps (no grad) is nobody's
    business; the check goes with the engine."""
    module = Net(Scaled())
    engine = noiseless_engine(mode, module, 1.0, 2)
    x = torch.randn(2, 4)
    layer = module.net[0]
    layer(x, torch.ones(1))  # not watching
    engine.start()
    for call in (lambda: layer(x, None), lambda: layer(x, scale=None)):
        call()
        engine.forget()
    with torch.no_grad():
        layer(x, torch.ones(1))
    engine.stop()
    engine.close()
    assert all(not layer._forward_pre_hooks for layer in module.modules())


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_layers_that_take_one_input_get_no_input_check(mode):
    """No cost for layers whose forward takes one input (every layer with a per-sample rule but EmbeddingBag): under
    functorch, which replays every layer, too."""
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    engine = noiseless_engine(mode, module, 1.0, 4)
    assert all(not layer._forward_pre_hooks for layer in module.modules())
    engine.close()


class ScaledLater(pl.LightningModule):
    """A replayed layer called ``(x, None)`` on the first batch and ``(x, scale)`` from the second on, beside an
    ``EmbeddingBag`` called ``(tokens, None)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.bag, self.head = Scaled(), nn.EmbeddingBag(10, 4, mode="sum"), nn.Linear(4, 3)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch
        hidden = self.layer(x, None if batch_idx == 0 else x.abs() + 0.5)
        hidden = hidden + self.bag((x.abs() * 3).long().clamp(max=9), None)
        return F.cross_entropy(self.head(hidden), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        inputs, labels = torch.randn(64, 4, generator=generator), torch.randint(0, 3, (64,), generator=generator)
        return DataLoader(TensorDataset(inputs, labels), batch_size=16)


@pytest.mark.parametrize(
    ("mode", "precision", "accelerator"),
    [
        ("hooks", "32-true", "cpu"),
        *[
            pytest.param(mode, precision, "gpu", marks=pytest.mark.cuda)
            for mode in ("hooks",)  # (functorch refuses the EmbeddingBag, ghost the replayed layer)
            for precision in ("32-true", "bf16-mixed")
        ],
    ],
)
def test_a_later_steps_other_input_is_refused_in_a_fit(mode, precision, accelerator):
    """Through the strategy (and on the GPU, in fp32 and bf16): ``layer(x, None)`` and ``bag(tokens, None)`` train;
    the second step, which passes the layer a second input, is refused before its update."""
    failure = ParametersAtFailure()
    with pytest.raises(RuntimeError, match=r"Layer 'layer' \(Scaled\) was called with inputs \['scale'\]"):
        _fit(
            ScaledLater(),
            mode,
            [failure],
            max_steps=3,
            limit_val_batches=0,
            accelerator=accelerator,
            precision=precision,
        )
    assert failure.steps == 1 and not failure.moved and failure.device == ("cuda" if accelerator == "gpu" else "cpu")


class Gate(nn.Module):
    """A conditioning gate: a Parameter of its own (no per-sample rule) times a factor its parent sets per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
        self.factor = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale * self.factor


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_dropout_switched_on_after_the_engine_is_built_is_refused_at_the_next_step(mode):
    """Built in eval mode (a pretrained model after ``model.eval()``), stepped in training mode: Opacus re-runs a copy
    made at build, in eval mode, so the dropout inside the replayed layer went unseen and the per-example gradients
    were not the step's. Refused by name when the step starts, before its forward pass."""
    torch.manual_seed(0)
    module = Net(DropoutBlock()).eval()
    engine = noiseless_engine(mode, module, 1.0, 6)  # in eval mode nothing draws: accepted
    module.train()
    with pytest.raises(RuntimeError, match=r"net\.0 \(DropoutBlock.*draws random numbers while training in \['drop'\]"):
        engine.start()
    engine.close()
    assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize(
    "layer", [Gate, DropoutBlock, FunctionalDropout, Scaled, WeightedBag], ids=lambda kind: kind.__name__
)
def test_ghost_clipping_refuses_every_layer_it_would_re_run_by_name(layer):
    """Ghost clipping takes the norms from the re-run but releases the real backward pass's gradient: wherever the
    two differ (a factor set after the engine was built, a dropout switched on) one example's contribution exceeded
    max_grad_norm (measured: 34x the bound). Refused before anything runs, naming the layer and the fix."""
    module = Net(layer().float())
    with pytest.raises(
        RuntimeError,
        match=rf"^grad_sample_mode='ghost' can't clip layers \[\"net\.0 \({layer.__name__}: \[.*\]\)\"\].*not be "
        r"bounded by max_grad_norm.*grad_sample_mode='hooks'.*requires_grad_\(False\)",
    ):
        noiseless_engine("ghost", module, 1.0, 6)
    assert all(not part._forward_hooks and not part._forward_pre_hooks for part in module.modules())


class CallsByKeyword(nn.Module):
    """``self.fc(input=x)``: a layer's input by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(input=x)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "bk"])
def test_a_layer_called_with_its_input_by_keyword_is_refused_by_name(mode):
    """Every engine's per-example rules read a layer's first positional input: hooks, functorch and bk failed with an
    IndexError. Refused in the forward pass, before any gradient."""
    module = CallsByKeyword()
    engine = noiseless_engine(mode, module, 1.0, 6)
    engine.start()
    with pytest.raises(RuntimeError, match=r"^Layer 'fc' \(Linear\) was called without a tensor as its first "):
        module(torch.randn(6, 4))
    engine.close()
    assert module.fc.weight.grad is None


def _doubled_by_a_hook(layer: nn.Linear) -> None:
    layer.register_forward_hook(lambda module, inputs, output: output + F.linear(inputs[0], module.weight))


def _doubled_on_the_instance(layer: nn.Linear) -> None:
    layer.forward = lambda x: F.linear(x, 2 * layer.weight, layer.bias)


@pytest.mark.parametrize("change", [_doubled_by_a_hook, _doubled_on_the_instance], ids=["hook", "instance-forward"])
def test_ghost_clipping_refuses_a_layer_whose_forward_was_changed(change):
    """Ghost norms come from nn.Linear's rule, the release from the real backward pass: a hook or an instance
    ``forward`` using the weight twice released 2x max_grad_norm per example, unrefused. Refused by name."""
    module = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    change(module[0])
    refusal = r"^grad_sample_mode='ghost' can't clip layers \['0 \(Linear\)'\]: .*'hooks'"
    with pytest.raises(RuntimeError, match=refusal):
        noiseless_engine("ghost", module, 1.0, 6)


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_parameter_registered_beside_a_layers_weight_is_refused_by_name(mode):
    """An adapter registered on an nn.Linear and used by its parent: Opacus's Linear rule forms weight and bias only,
    and the backward pass failed with "'Parameter' object has no attribute '_current_grad_sample'"."""
    module = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    module[0].register_parameter("adapter", nn.Parameter(torch.ones(4)))
    with pytest.raises(RuntimeError, match=r"^Parameters \['0\.adapter'\] are registered on layers whose per-sample "):
        noiseless_engine(mode, module, 1.0, 6)
