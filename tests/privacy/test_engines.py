"""The clipping engines behind one interface: the same driver code gives every engine's clipped, noised update.

Each engine is driven here exactly as the strategy drives it (start, forward, ``take_output``, ``backward``,
optionally ``carry`` for a physical part, the optimizer's step, stop, forget), on a plain module without a
Trainer, and checked against a ``vmap(grad)`` clip-and-sum reference in float64.
"""

import ast
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import lightning_nt.privacy
from lightning_nt.privacy.engines import ClippingEngine, clipping_engine, engine_class
from lightning_nt.privacy.engines.bk import BookKeepingEngine
from lightning_nt.privacy.engines.ghost import GhostClippingEngine
from lightning_nt.privacy.engines.hooks import OpacusHooksEngine
from tests.helpers.engines import NoPrecision

C = 2.0
ROWS = 12
ENGINES = ["hooks", "functorch", "ghost", "bk"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _batch():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(ROWS, 5, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 4, ROWS)[:, None]
    return inputs, torch.randint(3, (ROWS,), generator=generator)


def _reference(net, inputs, labels):
    """Per-example gradients by vmap(grad), clipped to C, summed, over the batch size; and their norms."""
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(net, p, (x[None],)), y[None])

    samples = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, labels)
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in samples.values()], dim=1).norm(dim=1)
    factors = (C / (norms + 1e-6)).clamp(max=1.0)
    update = {n: torch.einsum("b,b...->...", factors, g) / len(inputs) for n, g in samples.items()}
    return update, norms


def _engine(mode, net, views=1):
    engine = clipping_engine(
        mode,
        net,
        torch.optim.SGD(net.parameters(), lr=1.0),
        max_grad_norm=C,
        noise_multiplier=0.0,
        secure_mode=False,
        views=views,
        distributed=False,
    )
    engine.optimizer.expected_batch_size = ROWS
    return engine


def _part(engine, mode, net, inputs, labels, last):
    """One physical part as the strategy runs it: the last through ``backward``, earlier ones through ``carry``."""
    losses = F.cross_entropy(net(inputs), labels, reduction="none")
    loss = engine.take_output(losses if mode == "ghost" else losses.mean())  # ghost: training_step's [B] losses
    if last:
        engine.backward(loss, loss.backward, len(inputs), NoPrecision())
    else:
        loss.backward()
        engine.carry(len(inputs))


def _step(mode, parts=1):
    net = _net()
    inputs, labels = _batch()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine = _engine(mode, net)
    engine.start()
    engine.discard_per_example_state()
    bounds = torch.linspace(0, ROWS, parts + 1).long().tolist()
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        _part(engine, mode, net, inputs[start:end], labels[start:end], last=index == parts - 1)
    engine.optimizer.step()
    norms = engine.last_norms()
    engine.stop()
    engine.forget()
    update = {n: before[n] - p.detach() for n, p in net.named_parameters()}
    return net, engine, update, norms


def test_the_factory_chooses_one_engine_per_mode_and_its_optimizer():
    assert {mode: engine_class(mode) for mode in ["hooks", "functorch", "ghost", "bk"]} == {
        "hooks": OpacusHooksEngine,
        "functorch": OpacusHooksEngine,
        "ghost": GhostClippingEngine,
        "bk": BookKeepingEngine,
    }
    for mode in ["hooks", "ghost", "bk"]:
        engine = _engine(mode, _net())
        assert isinstance(engine, ClippingEngine) and isinstance(engine.optimizer, engine.optimizers[0])
        assert engine.optimizer.max_grad_norm == C and engine.optimizer.noise_multiplier == 0.0
        engine.close()


@pytest.mark.parametrize("mode", ENGINES)
def test_every_engine_gives_the_clipped_sum_through_the_same_calls(mode):
    _, _, update, norms = _step(mode)
    expected, expected_norms = _reference(_net(), *_batch())
    assert (expected_norms > C).sum() >= ROWS // 3 and (expected_norms < C).sum() >= ROWS // 3  # both kinds
    for name, value in update.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-7)  # hooks: fp32 samples
    torch.testing.assert_close(norms.double(), expected_norms, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_a_physical_part_carried_by_the_engine_adds_to_the_last(mode):
    _, _, whole, _ = _step(mode, parts=1)
    _, _, split, _ = _step(mode, parts=3)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", ENGINES)
def test_forget_leaves_nothing_of_the_batch_on_the_module_or_the_engine(mode):
    net, engine, _, _ = _step(mode)
    private = ("grad_sample", "summed_grad", "_current_grad_sample", "_norm_sample")
    assert [n for n, p in net.named_parameters() if any(a in vars(p) for a in private)] == []
    assert [n for n, m in net.named_modules() if "activations" in vars(m)] == []
    assert engine.last_norms() is None
    engine.close()


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_the_nonfinite_count_is_taken_once(mode):
    net = _net()
    inputs, labels = _batch()
    inputs[3] = float("nan")
    engine = _engine(mode, net)
    engine.start()
    _part(engine, mode, net, inputs, labels, last=True)
    engine.optimizer.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert engine.take_nonfinite_count() == 1
    assert engine.take_nonfinite_count() == 0
    engine.close()


@pytest.mark.parametrize(
    ("mode", "options", "match"),
    [
        ("ghost", {"virtual_steps": True}, "max_physical_batch_size"),
        ("ghost", {"views": 2}, "augmentation_multiplicity"),
        ("ghost", {"sensitivity_probe": True}, "sensitivity_probe"),
        ("bk", {"sensitivity_probe": True}, "sensitivity_probe"),
    ],
)
def test_an_engine_refuses_the_options_it_cannot_honour(mode, options, match):
    arguments = {"virtual_steps": False, "views": 1, "sensitivity_probe": False, **options}
    with pytest.raises(ValueError, match=match):
        engine_class(mode).check_options(mode, **arguments)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "bk"])
def test_engines_that_can_honour_every_option_accept_them(mode):
    probe = engine_class(mode).supports_sensitivity_probe
    engine_class(mode).check_options(mode, virtual_steps=True, views=2, sensitivity_probe=probe)
    engine_class(mode).check_precision("bf16-mixed")


def test_the_strategy_never_asks_which_engine_it_holds():
    """Issue 13: the mode is read in one place, the factory; the adapter and the step only call the interface."""
    privacy = Path(lightning_nt.privacy.__file__).parent
    for name in ("strategy.py", "step.py", "virtual_steps.py"):
        tree = ast.parse((privacy / name).read_text())
        compared = [
            ast.unparse(node)
            for node in ast.walk(tree)
            if isinstance(node, ast.Compare) and "grad_sample_mode" in ast.unparse(node)
        ]
        engines = [
            ast.unparse(node)
            for node in ast.walk(tree)
            if isinstance(node, ast.Name | ast.Attribute) and ast.unparse(node).endswith(("_clipper", "_hooks"))
        ]
        assert compared == [] and engines == [], name
