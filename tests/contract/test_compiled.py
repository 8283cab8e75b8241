"""Every capability on a module compiled with ``torch.compile`` gives the figures of the same module uncompiled.

Both ways users compile (``tests/helpers/zoo.py``): ``trainer.fit(torch.compile(module))`` and a submodule compiled
inside the LightningModule (names under ``_orig_mod.``), with ``backend="aot_eager"`` (AOTAutograd, which has no
double backward). Same seed, same data: the capability's own figures (history, report, scales, average) and the
trained weights equal those of the uncompiled ``mlp`` entry to a tight tolerance, or the capability refuses before
the first step naming the fix (DP-SGD). One slow test compiles with inductor, the real compiler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_nt import DPStrategy, GradInit, LazinessMonitor, RepresentationSimilarity, SharpnessMonitor
from lightning_nt.common import eager_execution, named_modules, uncompiled_name
from lightning_nt.gradinit.core import apply_scales
from lightning_nt.sharpness.hvp import HessianOperator
from tests.contract.capabilities import CAPABILITIES, Capability
from tests.contract.test_contract import assert_same_state, fit
from tests.helpers.trainer import tiny_trainer
from tests.helpers.zoo import ZOO, ZooModule

COMPILED = ("compiled_module", "compiled_submodule")
RTOL = 1e-5
"""aot_eager trains with decomposed kernels: the weights may differ from eager ones in the last bits."""


def _state(capability: Capability, built: Any) -> Any:
    """The capability's figures; an average keeps the module's ``state_dict`` names (it loads into the module),
    compared here without ``_orig_mod.``. Every other name (scales, tags, layers) must already be without it."""
    state = capability.state(built)
    if isinstance(state, dict) and "average" in state:
        state["average"] = {uncompiled_name(name): value for name, value in state["average"].items()}
    return state


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {uncompiled_name(name): tensor for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize(
    "capability", [pytest.param(c, id=c.name) for c in CAPABILITIES if not c.name.startswith("DPStrategy")]
)
def test_figures_equal_uncompiled(capability: Capability, compiled: str, tmp_path: Path) -> None:
    """Same seed, compiled or not: the capability's figures and the trained weights agree to ``RTOL``, and the tags
    logged are the same (named without ``_orig_mod.``)."""
    eager = fit(capability, ZOO["mlp"], tmp_path / "eager")
    run = fit(capability, ZOO[compiled], tmp_path / "compiled")
    for done in (eager, run):
        if done.error is not None:
            raise done.error
    assert run.trainer.global_step == eager.trainer.global_step > 0
    assert_same_state(_weights(run.module), _weights(eager.module), RTOL)
    assert_same_state(_state(capability, run.capability), _state(capability, eager.capability), RTOL)
    assert sorted(run.trainer.callback_metrics) == sorted(eager.trainer.callback_metrics), "tags differ"


@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk", "auto"])
def test_dp_refuses_compiled_modules(mode: str, compiled: str, tmp_path: Path) -> None:
    """DP-SGD refuses a compiled module before the first step, naming the fix: Opacus's per-example hooks are not
    seen by a graph compiled before them (found: the hooks engine then has no per-example gradient)."""
    strategy = DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0, grad_sample_mode=mode)
    trainer = tiny_trainer(tmp_path, strategy=strategy)
    with pytest.raises(RuntimeError, match=r"torch\.compile.*Train uncompiled under DP"):
        trainer.fit(ZOO[compiled].build())
    assert trainer.global_step == 0


def test_dp_still_trains_an_uncompiled_module_once_another_was_compiled(tmp_path: Path) -> None:
    """The refusal looks at the module given, not at whether anything was ever compiled in the process."""
    ZOO["compiled_submodule"].build()
    trainer = tiny_trainer(tmp_path, strategy=DPStrategy(noise_multiplier=1.0, max_grad_norm=1.0, seed=0))
    trainer.fit(ZOO["mlp"].build())
    assert trainer.global_step > 0


class _ReLUNet(ZooModule):
    def network(self) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


class _CompiledReLUNet(_ReLUNet):
    """A compiled submodule with a ReLU layer (``net._orig_mod.1``, ``net.1`` uncompiled)."""

    def network(self) -> nn.Module:
        return torch.compile(super().network(), backend="aot_eager")


def test_laziness_activation_flips_are_named_as_uncompiled(tmp_path: Path) -> None:
    """``laziness/activation_flips/<layer>`` of a compiled submodule: the uncompiled run's tags and figures."""
    histories = []
    for module in (_ReLUNet, _CompiledReLUNet):
        torch.manual_seed(0)
        monitor = LazinessMonitor(every_n_steps=2, num_examples=8)
        tiny_trainer(tmp_path / module.__name__, callbacks=[monitor]).fit(module())
        histories.append([{k: v for k, v in e.items() if k != "laziness/seconds"} for e in monitor.history])
    assert "laziness/activation_flips/net.1" in histories[1][-1]
    assert_same_state(histories[1], histories[0], RTOL)


def test_layer_names_with_or_without_the_compiled_prefix(tmp_path: Path) -> None:
    """A user may name a layer of a compiled submodule as ``named_modules()`` shows it (``net._orig_mod.1``) or as
    in the uncompiled module (``net.1``): both measure the same layer, logged without ``_orig_mod.``."""
    histories = []
    for name in ("net._orig_mod.1", "net.1"):
        torch.manual_seed(0)
        monitor = RepresentationSimilarity(layers=[name], every_n_epochs=1, num_examples=16)
        tiny_trainer(tmp_path / name, callbacks=[monitor]).fit(_CompiledReLUNet())
        histories.append(monitor.history)
    assert histories[0] == histories[1]
    assert [key for key in histories[0][-1] if key.startswith("similarity/cka/")] == ["similarity/cka/net.1"]


def test_eager_execution_runs_the_original_code_and_keeps_the_compiled_one() -> None:
    """Inside the block the compiled module runs its eager code (hooks fire, double backward works); after it, the
    same compiled code runs again, not recompiled."""
    torch.manual_seed(0)
    net = torch.compile(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), backend="aot_eager")
    inputs = torch.randn(5, 3)
    net(inputs)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    seen = []
    layers = named_modules(net)
    handle = layers["1"].register_forward_hook(lambda module, args, output: seen.append(output))
    with eager_execution():
        (grad,) = torch.autograd.grad(net(inputs).sum(), layers["0"].weight, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), layers["0"].weight)
    handle.remove()
    assert len(seen) == 1 and torch.isfinite(second).all()
    net(inputs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


@pytest.mark.slow
def test_sharpness_on_an_inductor_compiled_module_is_the_exact_hessian(tmp_path: Path) -> None:
    """``backend="inductor"`` (the default compiler): lambda_max of the probe loss's exact Hessian
    (``torch.autograd.functional.hessian``), although the compiled backward has no double backward."""
    torch.manual_seed(0)
    zoo_module = ZOO["mlp"].build()
    zoo_module.log = torch.compiler.disable(zoo_module.log)  # Lightning-AI/pytorch-lightning#21836
    monitor = SharpnessMonitor(every_n_steps=4, num_examples=32, max_iter=40, tol=1e-8, max_overhead=None)
    trainer = tiny_trainer(tmp_path, callbacks=[monitor], max_epochs=1)
    trainer.fit(torch.compile(zoo_module))
    measured = monitor.history[-1]
    assert measured["step"] == 4
    inputs, labels = zoo_module.train_dataloader().dataset.tensors
    parameters = [p.detach() for p in zoo_module.parameters()]
    shapes = [p.shape for p in parameters]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        values = torch.split(flat, [s.numel() for s in shapes])
        weights = {name: v.view(s) for (name, _), v, s in zip(zoo_module.named_parameters(), values, shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(zoo_module.net, _strip(weights), inputs), labels)

    with eager_execution():
        hessian = torch.autograd.functional.hessian(loss, torch.cat([p.flatten() for p in parameters]))
    exact = torch.linalg.eigvalsh(hessian)[-1].item()
    assert measured["sharpness/lambda_max"] == pytest.approx(exact, rel=1e-4)


def _strip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.removeprefix("net."): value for name, value in weights.items()}


def test_gradinit_scales_apply_to_a_compiled_submodule_by_either_name() -> None:
    """``apply_scales`` finds a compiled submodule's parameters named with or without ``_orig_mod.``."""
    net = nn.Sequential(torch.compile(nn.Linear(2, 2), backend="aot_eager"))
    layer = named_modules(net)["0"]
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    apply_scales(net, {"0.weight": 2.0, "0._orig_mod.bias": 0.5})
    torch.testing.assert_close(layer.weight.detach(), 2 * weight, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.detach(), 0.5 * bias, rtol=0, atol=0)


class _CountingBackend:
    """``aot_eager`` whose compiled graphs count their runs: how often training ran compiled code."""

    def __init__(self) -> None:
        self.runs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        from torch._dynamo.backends.debugging import aot_eager

        compiled = aot_eager(graph, example_inputs)

        def run(*args: Any) -> Any:
            self.runs += 1
            return compiled(*args)

        return run


def test_training_runs_the_compiled_code_as_often_with_every_monitor(tmp_path: Path) -> None:
    """No side effect on compilation: with monitors that differentiate twice and hook layers, training (and
    validation) run the compiled graphs exactly as often as without them, and nothing is compiled again."""
    runs, graphs = [], []
    for callbacks in ([], None):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        backend = _CountingBackend()
        torch.manual_seed(0)
        module = ZooModule()
        module.net = torch.compile(module.net, backend=backend)
        monitors = [
            GradInit(iterations=2),
            SharpnessMonitor(every_n_steps=2, num_examples=16, max_iter=8, max_overhead=None),
            RepresentationSimilarity(every_n_epochs=1, num_examples=16),
            LazinessMonitor(every_n_steps=2, num_examples=8),
        ]
        tiny_trainer(tmp_path / str(len(runs)), callbacks=monitors if callbacks is None else callbacks).fit(module)
        runs.append(backend.runs)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert runs[0] == runs[1] > 0
    assert graphs[0] == graphs[1]


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("compiled", COMPILED)
@pytest.mark.parametrize(
    "capability", [pytest.param(c, id=c.name) for c in CAPABILITIES if not c.name.startswith("DPStrategy")]
)
def test_cuda(capability: Capability, compiled: str, precision: str, tmp_path: Path) -> None:
    """On a GPU, fp32 and bf16-mixed: the fit of a compiled module completes and the tags are logged."""
    run = fit(capability, ZOO[compiled], tmp_path, accelerator="gpu", precision=precision, deterministic=False)
    if run.error is not None:
        raise run.error
    assert run.trainer.global_step == run.trainer.max_epochs * ZOO[compiled].steps_per_epoch
    assert all(tag in run.trainer.callback_metrics for tag in capability.tags(ZOO[compiled]))


def test_hessian_operator_on_a_compiled_network_is_the_exact_hessian() -> None:
    """The plain-PyTorch core, without a Trainer: Hessian-vector products through a compiled network equal the
    exact Hessian's (``torch.autograd.functional.hessian`` of the uncompiled function)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    compiled = torch.compile(net, backend="aot_eager")
    inputs, labels = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    params = list(net.parameters())
    compiled(inputs)  # compiled (and its backward with it) before any measurement
    operator = HessianOperator(params, lambda: [(nn.functional.cross_entropy(compiled(inputs), labels), 1.0)])
    names, shapes = [name for name, _ in net.named_parameters()], [p.shape for p in params]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        values = [v.view(s) for v, s in zip(torch.split(flat, [s.numel() for s in shapes]), shapes)]
        return nn.functional.cross_entropy(torch.func.functional_call(net, dict(zip(names, values)), inputs), labels)

    flat = torch.cat([p.detach().flatten() for p in params])
    exact = torch.autograd.functional.hessian(loss, flat)
    vector = torch.randn(flat.numel())
    torch.testing.assert_close(operator.matvec(vector), exact @ vector, rtol=1e-5, atol=1e-6)
