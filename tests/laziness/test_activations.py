"""ReLU-family activations of any class are found by what they compute, as RepresentationSimilarity finds them."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_nt.laziness import LazinessMonitor, activation_layers, activation_patterns, is_activation
from lightning_nt.laziness.patterns import pattern_flips, piece_boundaries
from tests.helpers import seeded_fit, tiny_trainer
from tests.laziness.models import ReLUClassifier


class MyReLU(nn.Module):  # a model's own ReLU class
    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(min=0)


class GELUActivation(nn.Module):  # HuggingFace BERT's
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x)


class Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class MyTanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.tanh()


class ScaledReLU(nn.Module):  # holds a parameter: not an activation of the ReLU family by what it computes
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) * self.scale


EQUAL_TO_RELU: dict[str, Callable[[], nn.Module]] = {
    "MyReLU": MyReLU,
    "Hardtanh(0, inf)": functools.partial(nn.Hardtanh, 0.0, math.inf),
    "Threshold(0, 0)": functools.partial(nn.Threshold, 0.0, 0.0),
}


@pytest.mark.parametrize(
    "module",
    [
        *(make() for make in EQUAL_TO_RELU.values()),
        GELUActivation(),
        Swish(),
        nn.LeakyReLU(0.1),
        nn.PReLU(),
        nn.ReLU6(),
        nn.Hardtanh(),
        nn.ELU(),
    ],
    ids=lambda module: type(module).__name__,
)
def test_relu_family_modules_of_any_class_are_activations(module: nn.Module) -> None:
    """By type (``ACTIVATIONS``: LeakyReLU, PReLU, ReLU6 gate at 0) or by the function a parameter-free module
    computes (found: ``class MyReLU``, ``nn.Hardtanh(0, inf)`` and ``nn.Threshold(0, 0)`` were missed)."""
    assert is_activation(module)
    assert activation_layers(nn.Sequential(nn.Linear(3, 3), module)) == ["1"]


@pytest.mark.parametrize(
    "module",
    [nn.Tanh(), MyTanh(), nn.Sigmoid(), nn.Softmax(dim=-1), nn.Identity(), nn.Dropout(), ScaledReLU()],
    ids=lambda module: type(module).__name__,
)
def test_a_module_outside_the_relu_family_is_not_taken_for_one(module: nn.Module) -> None:
    """Tanh and sigmoid have no gate at 0 (RepresentationSimilarity recognises them, with their own groups)."""
    assert not is_activation(module)
    assert activation_layers(nn.Sequential(nn.Linear(3, 3), module)) == []


def _with(activation: Callable[[], nn.Module] | None) -> ReLUClassifier:
    """``ReLUClassifier`` with its two ``nn.ReLU`` modules replaced by ``activation()`` (None: as it is)."""
    module = ReLUClassifier(shuffle=False)
    if activation is not None:
        module.net[2], module.net[5] = activation(), activation()
    return module


@pytest.mark.parametrize("activation", EQUAL_TO_RELU.values(), ids=list(EQUAL_TO_RELU))
def test_a_module_equal_to_relu_gives_the_patterns_of_nn_relu(activation: nn.Module) -> None:
    torch.manual_seed(0)
    reference, inputs = _with(None), torch.randn(12, 8)
    custom = _with(activation)
    custom.load_state_dict(reference.state_dict())
    expected = activation_patterns(reference, inputs)
    patterns = activation_patterns(custom, inputs)
    assert list(patterns) == list(expected) == ["net.2", "net.5"]
    for name, pattern in expected.items():
        assert torch.equal(patterns[name], pattern), name


@pytest.mark.parametrize("activation", EQUAL_TO_RELU.values(), ids=list(EQUAL_TO_RELU))
def test_a_module_equal_to_relu_is_measured_exactly_as_nn_relu(activation: nn.Module) -> None:
    """The same network with ``nn.ReLU`` or a module of another class equal to it: the same figures (found: no
    ``laziness/activation_flips`` and a warning that the model has no ReLU-family activation)."""
    histories = []
    for replacement in (None, activation):
        monitor = LazinessMonitor(every_n_steps=2, num_examples=16)
        seeded_fit([monitor], functools.partial(_with, replacement), max_steps=4)
        histories.append(
            [{tag: v for tag, v in entry.items() if tag != "laziness/seconds"} for entry in monitor.history]
        )
    assert "laziness/activation_flips/net.5" in histories[0][-1]
    assert histories[1] == histories[0]


class MyReLU6(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(0, 6)


class MyHardtanh(nn.Module):  # a clamp to [-1, 2]
    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.maximum(x, torch.tensor(-1.0)), torch.tensor(2.0))


class MyLeakyReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, x, 0.2 * x)


def _patterns_of(activation: nn.Module, pre_activations: list[float]) -> Tensor:
    """The pattern of ``activation`` after an identity layer, on one example whose pre-activations are given."""
    net = nn.Sequential(nn.Identity(), activation)
    return activation_patterns(net, torch.tensor([pre_activations]), ["1"])["1"]


CLAMPS_TO_0_6 = {"ReLU6": nn.ReLU6, "Hardtanh(0, 6)": functools.partial(nn.Hardtanh, 0.0, 6.0), "MyReLU6": MyReLU6}
CLAMPS_TO_MINUS_1_2 = {"Hardtanh(-1, 2)": functools.partial(nn.Hardtanh, -1.0, 2.0), "MyHardtanh": MyHardtanh}


@pytest.mark.parametrize("activation", CLAMPS_TO_0_6.values(), ids=list(CLAMPS_TO_0_6))
def test_a_relu6_pattern_is_the_piece_each_unit_is_on_and_saturation_counts_as_a_flip(activation) -> None:
    """Three linear pieces: below 0, on [0, 6], above 6 (found: the pattern was the sign only, so a unit that
    saturated at 6 did not flip; ``nn.Hardtanh(0, 6)`` and a hand-written ReLU6 were not activations)."""
    before = _patterns_of(activation(), [-1.0, 0.0, 3.0, 6.0, 7.0, 5.0, 2.0])
    after = _patterns_of(activation(), [-1.0, 0.5, 7.0, 6.5, 7.0, -2.0, 2.0])
    assert before.dtype == torch.uint8
    assert before.tolist() == [[0, 0, 1, 1, 2, 1, 1]] and after.tolist() == [[0, 1, 2, 2, 2, 0, 1]]
    assert pattern_flips({"1": before}, {"1": after}) == {"1": 4 / 7, "": 4 / 7}  # 0 -> 0.5, 3 -> 7, 6 -> 6.5, 5 -> -2


@pytest.mark.parametrize("activation", CLAMPS_TO_MINUS_1_2.values(), ids=list(CLAMPS_TO_MINUS_1_2))
def test_a_hardtanh_pattern_has_its_pieces_at_its_bounds(activation) -> None:
    assert piece_boundaries(activation()) == (-1.0, 2.0)
    assert _patterns_of(activation(), [-3.0, -1.0, -0.5, 0.0, 2.0, 2.5]).tolist() == [[0, 0, 1, 1, 1, 2]]


@pytest.mark.parametrize(
    ("activation", "boundary"),
    [(nn.Hardtanh(-math.inf, 0.5), 0.5), (nn.Hardtanh(-2.0, math.inf), -2.0), (MyLeakyReLU(), 0.0)],
    ids=str,
)
def test_an_activation_with_two_pieces_keeps_a_boolean_pattern(activation, boundary) -> None:
    """A clamp at one end has two pieces, like ReLU: its pattern stays a boolean, ``True`` above the boundary."""
    assert piece_boundaries(activation) == (boundary,)
    values = [boundary - 1.0, boundary, boundary + 0.25]
    assert _patterns_of(activation, values).tolist() == [[False, False, True]]


def test_a_hand_written_leaky_relu_gives_the_patterns_of_nn_leaky_relu() -> None:
    torch.manual_seed(0)
    reference, inputs = _with(functools.partial(nn.LeakyReLU, 0.2)), torch.randn(12, 8)
    custom = _with(MyLeakyReLU)
    custom.load_state_dict(reference.state_dict())
    expected, patterns = activation_patterns(reference, inputs), activation_patterns(custom, inputs)
    assert list(patterns) == list(expected) == ["net.2", "net.5"]
    assert all(
        torch.equal(patterns[name], pattern) and pattern.dtype == torch.bool for name, pattern in expected.items()
    )


def test_the_monitor_counts_the_relu6_flips_of_the_core() -> None:
    """Through the Trainer: ``laziness/activation_flips`` of a ReLU6 network is the share of (example, unit) pieces
    that changed, saturations included, as :func:`pattern_flips` of the patterns before and after training."""
    module = _with(nn.ReLU6)
    with torch.no_grad():  # large weights, so that units saturate at 6
        module.net[0].weight.mul_(20.0)
    initial = copy.deepcopy(module)
    monitor = LazinessMonitor(every_n_steps=4, num_examples=16, ntk=False)
    seeded_fit([monitor], lambda: module, max_steps=4)
    inputs = next(iter(module.train_dataloader()))[0][:16]
    before, after = activation_patterns(initial.eval(), inputs), activation_patterns(module.eval(), inputs)
    saturated = int(sum((pattern == 2).sum() for pattern in before.values()))
    assert saturated > 0 and before["net.2"].dtype == torch.uint8
    flips = pattern_flips(before, after)[""]
    signs = pattern_flips({k: p > 0 for k, p in before.items()}, {k: p > 0 for k, p in after.items()})[""]
    assert monitor.history[-1]["laziness/activation_flips"] == pytest.approx(flips) and flips > signs


class MyReLU6InPlace(nn.Module):  # a model's own in-place clamp
    def forward(self, x: Tensor) -> Tensor:
        return x.clamp_(0, 6)


IN_PLACE_CLAMPS = {
    "ReLU6": (functools.partial(nn.ReLU6, inplace=False), functools.partial(nn.ReLU6, inplace=True)),
    "Hardtanh(-1, 2)": (
        functools.partial(nn.Hardtanh, -1.0, 2.0, inplace=False),
        functools.partial(nn.Hardtanh, -1.0, 2.0, inplace=True),
    ),
    "ReLU": (functools.partial(nn.ReLU, inplace=False), functools.partial(nn.ReLU, inplace=True)),
    "clamp_": (MyReLU6, MyReLU6InPlace),
}


@pytest.mark.parametrize(("copying", "in_place"), IN_PLACE_CLAMPS.values(), ids=list(IN_PLACE_CLAMPS))
def test_an_in_place_activation_has_the_patterns_and_flips_of_its_copying_form(copying, in_place) -> None:
    """Found: an in-place clamp (torchvision MobileNetV2's ``ReLU6(inplace=True)``) overwrote its input before the
    forward hook read it, so no unit was ever above the upper bound and saturations were not flips."""
    torch.manual_seed(0)
    reference = _with(copying)
    with torch.no_grad():  # large weights, so that units saturate
        reference.net[0].weight.mul_(20.0)
    moved = copy.deepcopy(reference)
    with torch.no_grad():
        moved.net[0].weight.mul_(1.5)
    inputs = torch.randn(16, 8)
    patterns = {}
    for kind, activation in (("copying", copying), ("in_place", in_place)):
        for state, source in (("before", reference), ("after", moved)):
            net = _with(activation)
            net.load_state_dict(source.state_dict())
            patterns[kind, state] = activation_patterns(net.eval(), inputs)
    for state in ("before", "after"):
        assert all(torch.equal(patterns["in_place", state][k], p) for k, p in patterns["copying", state].items())
    flips = pattern_flips(patterns["copying", "before"], patterns["copying", "after"])
    assert pattern_flips(patterns["in_place", "before"], patterns["in_place", "after"]) == flips
    assert flips[""] > 0


class _Clamped(ReLUClassifier):
    """``ReLUClassifier`` with a ReLU6 and a Hardtanh, whose patterns an older version recorded differently."""

    def __init__(self) -> None:
        super().__init__(shuffle=False)
        self.net[2], self.net[5] = nn.ReLU6(), nn.Hardtanh()


def test_a_run_resumed_from_a_checkpoint_with_sign_patterns_counts_what_they_recorded(tmp_path) -> None:
    """A checkpoint saved before clamps had piece patterns: ReLU6's initial pattern is its signs, and the Hardtanh
    has none (found: the resumed fit failed in ``pattern_flips``, "The pattern sets cover different layers")."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    first = LazinessMonitor(every_n_steps=3, num_examples=16, ntk=False)
    seeded_fit([first, checkpoint], _Clamped, max_epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    patterns = saved["callbacks"][first.state_key]["initial"]["patterns"]
    assert patterns["net.2"].dtype == torch.uint8 and "net.5" in patterns
    saved["callbacks"][first.state_key]["initial"]["patterns"] = {"net.2": patterns["net.2"] > 0}  # as it was
    torch.save(saved, tmp_path / "older.ckpt")
    resumed, module = LazinessMonitor(every_n_steps=3, num_examples=16, ntk=False), _Clamped()
    with pytest.warns(UserWarning, match=r"signs for \['net\.2'\] and nothing for \['net\.5'\]"):
        tiny_trainer(None, callbacks=[resumed], max_epochs=2).fit(module, ckpt_path=str(tmp_path / "older.ckpt"))
    inputs = next(iter(module.train_dataloader()))[0][:16]
    now = activation_patterns(module.eval(), inputs)["net.2"] > 0
    expected = pattern_flips({"net.2": patterns["net.2"] > 0}, {"net.2": now})["net.2"]
    last = resumed.history[-1]
    assert last["laziness/activation_flips/net.2"] == pytest.approx(expected) == last["laziness/activation_flips"]
    assert "laziness/activation_flips/net.5" not in last
