"""Opacus forms the per-example gradients of a layer without a per-sample rule (every layer under
``grad_sample_mode="functorch"``) by re-running its forward pass on each example under ``vmap(grad)``. State the
layer has at its call but Opacus's copy made at build didn't made the update the clipped sum of another computation's
gradients, bounded but not the step's, and silent. Each call is now re-run as the layer was when it began (a shallow
snapshot), and each re-run's output is checked against its call's: where the re-run can't reproduce the call (a
per-example attribute, an attribute changed in place since the call, an output that is not one tensor) it is refused
by name before any noise, and where it does it trains exactly (against a ``vmap(grad)`` reference of the real model),
without false refusals in float64, float32 and bfloat16 autocast, on the CPU and the GPU.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_nt.privacy.engines.replay import RECORDED_CALLS, SNAPSHOTS
from tests.contract.test_zoo_structures import _reference_update
from tests.helpers.engines import NoPrecision, noiseless_engine, noiseless_update

REPLAYING_MODES = ["hooks", "functorch"]


class Gate(nn.Module):
    """A conditioning gate: a Parameter of its own (no per-sample rule) times a ``factor`` and a ``cond`` its parent
    may set."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
        self.factor, self.cond, self.calls, self.settings, self.offset = 1.0, None, 0, {"gain": 1.0}, 0.0
        self.kept: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        counted = self.calls if self.counting else 1
        gain = self.settings["gain"]
        output = x * self.scale * self.factor * gain * counted * (1.0 if self.cond is None else self.cond)
        if self.caching:
            self.last = output  # kept for inspection (a tensor of the step's graph)
            self.kept.append(output.detach())
        return output + self.offset


class Block(nn.Module):
    """A layer scale (no per-sample rule) over an ``nn.Linear``: the block is re-run whole."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
        self.inner = nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) * self.scale


class Model(nn.Module):
    """``gate`` (or a ``Block``) then a linear head; ``kind`` says how the parent uses the gate."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.gate = Block() if kind == "hook" else Gate()
        self.gate.counting = kind == "counting"  # a forward that counts its calls (and scales by the count)
        self.gate.caching = kind == "caching"  # a forward that keeps its output; a tensor of a graph held at build
        self.gate.last = self.gate.scale * 2 if kind == "caching" else None
        self.head = nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "film":  # a per-example conditioning vector, [B, 4], set by the parent before the call
            self.gate.cond = x.detach() ** 2
        if self.kind == "settings":  # a setting in a dictionary the layer holds, changed after the call
            self.gate.settings["gain"] = 2.0
            try:
                return self.head(torch.tanh(self.gate(x)))
            finally:
                self.gate.settings["gain"] = 6.0
        if self.kind == "inplace":  # an offset tensor the layer holds, changed in place after the call
            self.gate.offset = torch.full((4,), 0.5, dtype=torch.float64)
            try:
                return self.head(torch.tanh(self.gate(x)))
            finally:
                self.gate.offset.mul_(3.0)
        if self.kind == "twice":  # one layer, two calls, two factors
            self.gate.factor = 1.0
            x = torch.tanh(self.gate(x))
            self.gate.factor = 3.0
        if self.kind == "around":  # a factor set around the call and restored before the backward pass
            self.gate.factor = 3.0
            try:
                return self.head(torch.tanh(self.gate(x)))
            finally:
                self.gate.factor = 1.0
        return self.head(torch.tanh(self.gate(x)))


def _set_after_build(module: Model) -> None:
    module.gate.factor = 2.5  # an annealed temperature, set once the engine exists


def _hook_added_after_build(module: Model) -> None:
    module.gate.inner.register_forward_hook(lambda layer, inputs, output: torch.tanh(output) * 3)


_AFTER_BUILD: dict[str, Callable[[Model], None]] = {"attribute": _set_after_build, "hook": _hook_added_after_build}


def _problem(kind: str) -> tuple[Model, Tensor, Tensor]:
    torch.manual_seed(0)
    inputs, labels = torch.randn(8, 4, dtype=torch.float64), torch.randint(3, (8,))
    return Model(kind), inputs, labels


def _private_update(mode: str, module: nn.Module, inputs: Tensor, labels: Tensor, clip: float, kind: str) -> dict:
    """One noiseless private step (the change of every trainable parameter), the engine built before the change
    ``kind`` makes (if any)."""
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    engine = noiseless_engine(mode, module, clip, len(inputs))
    try:
        _AFTER_BUILD.get(kind, lambda module: None)(module)
        engine.start()
        engine.discard_per_example_state()
        output = engine.take_output(F.cross_entropy(module(inputs), labels))
        engine.backward(output, output.backward, len(inputs), NoPrecision())
        engine.optimizer.step()
    finally:
        engine.stop()
        engine.forget()  # as the strategy does when a step fails: the batch's records go
        engine.close()
    return {name: module.get_parameter(name).detach() - value for name, value in before.items()}


def _expected(kind: str) -> tuple[dict[str, Tensor], float]:
    """The ``vmap(grad)`` reference update of the problem ``kind`` (changed as the step sees it), and its bound."""
    module, inputs, labels = _problem(kind)
    _AFTER_BUILD.get(kind, lambda module: None)(module)
    return _reference_update(module, inputs, labels)


@pytest.mark.parametrize("kind", ["attribute", "around", "twice", "hook", "settings", "counting", "caching"])
@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_layer_is_re_run_as_it_was_at_each_call(mode, kind):
    """Opacus re-ran a copy made when the engine was built: an attribute set since (an annealed temperature), a
    factor set around the call and restored before the backward pass, a layer called twice with two factors, a
    forward hook added inside the layer since, a forward that counts its calls: each update was another
    computation's, silently (and a setting changed in a dictionary the layer holds); a layer holding a tensor of an
    autograd graph failed when the engine was built (Opacus deep-copied it). Each call is re-run as the layer was
    when it began: exact against ``vmap(grad)``, and the re-run's own writes stay out of the layer (called once, it
    counts one; it keeps the call's output, and no tensor of the re-run's ``vmap`` escapes into its list)."""
    expected, clip = _expected(kind)
    module, inputs, labels = _problem(kind)
    update = _private_update(mode, module, inputs, labels, clip, kind)
    for name, value in expected.items():
        torch.testing.assert_close(update[name], -value, rtol=1e-10, atol=1e-12)
    assert getattr(module.gate, "calls", 1) == (2 if kind == "twice" else 1)  # the calls of the step's forward
    at_call = inputs * torch.linspace(0.5, 1.5, 4, dtype=torch.float64)  # the output of the call (scale before)
    assert kind != "caching" or (torch.equal(module.gate.last, at_call) and torch.equal(*module.gate.kept, at_call))


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_per_example_attribute_is_refused_before_any_noise(mode):
    """A FiLM conditioning ``[B, d]`` set by the parent on the layer: a re-run of the layer as it was at the call
    applies the whole batch's conditioning to each example (example i's gradient held every example's data: the
    update moved 1.6-2.3x the bound when one example was replaced), and Opacus's copy made at build none (wrong).
    Refused by name, naming the shapes; nothing released, nothing left on the layers."""
    module, inputs, labels = _problem("film")
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(
        RuntimeError,
        match=r"^Layer 'gate' \(Gate\) holds cond: a tensor with a row per example of the batch \(8\), set from "
        r"outside its forward pass.*Refused before any noise.*first input.*per-sample rule.*'bk'",
    ):
        _private_update(mode, module, inputs, labels, 1.0, "film")
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))
    assert all(not ({RECORDED_CALLS, SNAPSHOTS} & set(vars(layer))) for layer in module.modules())


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_an_attribute_changed_in_place_before_the_backward_pass_is_refused(mode):
    """What a snapshot shares (an attribute's tensor, unused by the backward pass) changed in place between the call
    and the backward pass: the re-run can't reproduce the call, and says so (the values, by how much); Opacus's copy
    made at build re-ran the offset of then, silently."""
    module, inputs, labels = _problem("inplace")
    refusal = (
        r"^Layer 'gate' \(Gate\): .*that re-run's output differs from the call's by up to [0-9.]+ relative to the "
    )
    with pytest.raises(RuntimeError, match=refusal + r"example's largest output \(rounding in float64 allows 1e-09\)"):
        _private_update(mode, module, inputs, labels, 1.0, "inplace")


class Residual(nn.Module):
    """A pre-norm residual MLP block with a layer scale (no per-sample rule: re-run whole under hooks)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), 0.5))
        self.norm, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.down(F.gelu(self.up(self.norm(x))))


def _fp32_problem(device: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 64), Residual(64), Residual(64), nn.Linear(64, 5)).to(device)
    return module, torch.randn(16, 16, device=device), torch.randint(5, (16,), device=device)


def _trains_without_refusal(mode: str, device: str, precision: str) -> dict[str, Tensor]:
    module, inputs, labels = _fp32_problem(device)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    engine = noiseless_engine(mode, module, 1.0, len(inputs))
    for _ in range(2):
        engine.start()
        engine.discard_per_example_state()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = F.cross_entropy(module(inputs).float(), labels)
        output = engine.take_output(loss)
        engine.backward(output, output.backward, len(inputs), NoPrecision())
        engine.optimizer.step()
        engine.optimizer.zero_grad()
        engine.stop()
        engine.forget()
    engine.close()
    return {name: module.get_parameter(name).detach() - value for name, value in before.items()}


@pytest.mark.parametrize(
    ("device", "precision"),
    [
        ("cpu", "32-true"),
        ("cpu", "bf16-mixed"),
        *[pytest.param("cuda", precision, marks=pytest.mark.cuda) for precision in ("32-true", "bf16-mixed")],
    ],
)
@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_re_run_reproducing_its_call_is_not_refused_in_float32_and_bfloat16(mode, device, precision):
    """No false refusal where the re-run and the call round differently (one example against the batch; bfloat16
    autocast: measured one unit of rounding, 8e-3, against the 3e-2 allowed; TF32 on the GPU): two steps train, and
    in float32 the first moves every parameter as a float64 ``vmap(grad)`` reference does."""
    update = _trains_without_refusal(mode, device, precision)
    assert all(value.abs().sum() > 0 for value in update.values())
    if precision == "32-true" and device == "cpu":
        module, inputs, labels = _fp32_problem(device)
        reference, clip = _reference_update(copy.deepcopy(module).double(), inputs.double(), labels)
        engine_update = noiseless_update(mode, module, inputs, labels, clip)
        for name, value in reference.items():
            torch.testing.assert_close(engine_update[name], -value.float(), rtol=1e-4, atol=1e-7)


class Pair(nn.Module):
    """A layer scale returning a pair (its scaled input and its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.scale, x


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_re_run_layer_returning_a_tuple_is_refused_by_name(mode):
    """Opacus's re-run multiplies a layer's output by its gradient: a tuple failed with a bare TypeError ("only
    integer tensors of a single element can be converted to an index") in the backward pass."""
    module = nn.Sequential(Pair(), nn.Linear(4, 3))
    module.forward = lambda x: module[1](module[0](x)[0])
    inputs, labels = torch.randn(8, 4), torch.randint(3, (8,))
    with pytest.raises(RuntimeError, match=r"^Layer '0' \(Pair\) returns a tuple, not one tensor: .*Return one tensor"):
        _private_update(mode, module, inputs, labels, 1.0, "tuple")


class MyEmbedding(nn.Embedding):
    """An ``nn.Embedding`` subclass: no per-sample rule for a subclass, so it is re-run."""


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_re_run_layer_on_integer_input_trains_without_an_autocast_warning(mode):
    """Opacus's re-run opened ``torch.autocast`` with the input's dtype whenever it differs from the parameters' (an
    integer one here): "In CPU autocast, but the target dtype is not supported" on every backward pass."""
    torch.manual_seed(0)
    embedding = MyEmbedding(10, 4)
    module = nn.Sequential(embedding, nn.Flatten(), nn.Linear(20, 3))
    tokens, labels = torch.randint(10, (8, 5)), torch.randint(3, (8,))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*autocast.*")
        update = _private_update(mode, module, tokens, labels, 1.0, "tokens")
    assert update["0.weight"].abs().sum() > 0


class SlicedShift(nn.Module):
    """FiLM shift whose conditioning the parent sets for the batch and the layer slices to it (``cond[:len(x)]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale, self.cond = nn.Parameter(torch.ones(4)), None

    def forward(self, x: Tensor) -> Tensor:
        return x + self.scale * self.cond[: len(x)]


class MaskedScores(nn.Module):
    """Attention scores with a bias of their own, masked with -inf at padded keys by a mask the parent sets."""

    def __init__(self) -> None:
        super().__init__()
        self.bias, self.pad = nn.Parameter(torch.randn(6, 6) * 0.5), None

    def forward(self, x: Tensor) -> Tensor:
        return (x @ x.transpose(-1, -2) + self.bias).masked_fill(self.pad[: len(x)], float("-inf"))


class Conditioned(nn.Module):
    """Per-example conditioning set as an attribute and sliced by the layer: the real model keeps every example's
    own row; a re-run of one example takes row 0. On a residual stream of 1e6 (sliced FiLM) or behind a -inf mask
    (scores), the re-run's output is within the check's tolerance or left out, and one example moved the update by
    2-12x the bound 2C/B before this was refused."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.layer = SlicedShift() if kind == "film" else MaskedScores()
        self.head = nn.Linear(4 if kind == "film" else 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "film":
            self.layer.cond = torch.tanh(x.detach())
            return self.head(self.layer(x + 1e6) - 1e6)
        tokens = x.reshape(len(x), 6, 8)
        lengths = 1 + (x[:, 0].abs() * 10).long() % 6
        self.layer.pad = (torch.arange(6)[None, :] >= lengths[:, None])[:, None, :]
        return self.head((torch.softmax(self.layer(tokens), -1) @ tokens)[:, 0])


@pytest.mark.parametrize("kind", ["film", "masked"])
@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_per_example_attribute_sliced_to_the_batch_is_refused_whatever_the_output_shows(mode, kind):
    torch.manual_seed(0)
    module = Conditioned(kind)
    inputs = torch.randn(8, 4 if kind == "film" else 48)
    before = [p.detach().clone() for p in module.parameters()]
    engine = noiseless_engine(mode, module, 1e-3, len(inputs))
    engine.start()
    engine.discard_per_example_state()
    output = engine.take_output(F.cross_entropy(module(inputs), torch.randint(3, (8,))))
    with pytest.raises(RuntimeError, match=r"^Layer 'layer' \(\w+\) holds (cond|pad): a tensor with a row per example"):
        engine.backward(output, output.backward, len(inputs), NoPrecision())
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


class Cancels(nn.Module):
    """``f(x) - x`` with ``f`` near the identity: the output is a small difference of large terms."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(width) + 1e-3 * torch.randn(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) - x


def test_a_re_run_computes_under_the_autocast_of_its_call():
    """A layer with cancellation under bf16 autocast: re-run in float32 (Opacus's rule: autocast only where the input's
    dtype differs from the parameters': here the float32 data), its output differed from the bfloat16 call's by 7% and
    it was refused."""
    torch.manual_seed(0)
    module = nn.Sequential(Cancels(512), nn.Linear(512, 3))
    inputs, labels = torch.randn(16, 512), torch.randint(3, (16,))
    engine = noiseless_engine("hooks", module, 1.0, len(inputs))
    engine.start()
    engine.discard_per_example_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(module(inputs).float(), labels)
    output = engine.take_output(loss)
    engine.backward(output, output.backward, len(inputs), NoPrecision())
    engine.optimizer.step()
    assert module[0].weight.grad is not None and bool(module[0].weight.grad.isfinite().all())


class ThroughAList(nn.Module):
    """A re-run layer reaching a trainable layer of the model through a plain list (not a submodule of its own)."""

    def __init__(self, shared: nn.Linear) -> None:
        super().__init__()
        self.scale, self.helpers = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64)), [shared]

    def forward(self, x: Tensor) -> Tensor:
        return self.helpers[0](x) * self.scale


class SharesThroughAList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4, dtype=torch.float64)
        self.gate, self.head = ThroughAList(self.lin), nn.Linear(4, 3, dtype=torch.float64)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gate(torch.tanh(self.lin(x))))


@pytest.mark.parametrize("mode", REPLAYING_MODES)
def test_a_layer_reached_through_a_list_is_not_recorded_again_inside_a_re_run(mode):
    """The engines' hooks on the shared layer fired inside the re-run's vmap (bare vmap errors) before."""
    torch.manual_seed(0)
    module = SharesThroughAList()
    inputs, labels = torch.randn(8, 4, dtype=torch.float64), torch.randint(3, (8,))
    expected, clip = _reference_update(copy.deepcopy(module), inputs, labels)
    update = noiseless_update(mode, module, inputs, labels, clip)
    for name, value in expected.items():
        torch.testing.assert_close(update[name], -value, rtol=1e-9, atol=1e-12)
