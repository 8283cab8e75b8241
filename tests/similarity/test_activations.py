"""Activation modules written elsewhere are recognised by what they compute (``similarity.activations``)."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import Tensor, nn

from lightning_nt.similarity import RepresentationSimilarity
from lightning_nt.similarity.activations import clamp_group, recognised_activation
from tests.helpers import TinyClassifier, seeded_fit, tiny_trainer


class GELUActivation(nn.Module):  # HuggingFace BERT's, through the functional GELU
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.gelu(x)


class NewGELUActivation(nn.Module):  # HuggingFace GPT-2's, the tanh approximation written out
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class FastGELUActivation(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


class Swish(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x)


class FunctionalReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x, min=0)


class CappedReLU(nn.Module):  # ReLU capped far out
    def forward(self, x: Tensor) -> Tensor:
        return x.clamp(0, 60)


class QuickGELU(nn.Module):  # x sigmoid(1.702 x): close to GELU, not GELU
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ReversedReLU(nn.Module):  # mixes positions
    def forward(self, x: Tensor) -> Tensor:
        return x.flip(-1).relu()


class Scaled(nn.Module):  # holds a buffer: never run
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(()))
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return torch.relu(x) * self.scale


@pytest.mark.parametrize(
    ("module", "group"),
    [
        (GELUActivation(), "gelu"),
        (NewGELUActivation(), "gelu"),
        (FastGELUActivation(), "gelu"),
        (Swish(), "gelu"),
        (FunctionalReLU(), "relu"),
        (nn.Tanh(), "tanh"),
        (nn.Hardtanh(-1e9, 1e9), None),  # the identity on the grid: not an activation with a known group
        (nn.Sigmoid(), "sigmoid"),
        (QuickGELU(), None),
        (nn.ReLU6(), "gelu"),  # equal to ReLU on [-6, 6] only; positive scalings are not its symmetries
        (CappedReLU(), "gelu"),  # a clamp to [0, 60]: the permutations, as ReLU6
        (ReversedReLU(), None),
        (nn.Softmax(dim=-1), None),
        (nn.Identity(), None),
        (nn.Flatten(0), None),
        (nn.Sequential(nn.ReLU()), None),  # containers are not activations
        (nn.Linear(241, 241), None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, nn.Module) else str(value),
)
def test_a_module_is_recognised_by_the_function_it_computes(module: nn.Module, group: str | None) -> None:
    assert recognised_activation(module) == group


def test_a_module_with_state_is_not_run() -> None:
    module = Scaled()
    assert recognised_activation(module) is None and module.calls == 0


def test_dropout_runs_in_eval_mode_and_leaves_the_random_state_and_the_mode_as_they_were() -> None:
    dropout = nn.Dropout(0.5).train()
    state = torch.get_rng_state()
    assert recognised_activation(dropout) is None
    assert torch.equal(torch.get_rng_state(), state) and dropout.training


def test_the_callback_compares_the_outputs_of_an_activation_class_written_elsewhere() -> None:
    """BERT's GELU as HuggingFace writes it: found by ``layers=None``, with the GELU group."""
    module = TinyClassifier(num_samples=64, shuffle=False)
    module.net[1] = GELUActivation()
    monitor = RepresentationSimilarity(num_examples=32)
    seeded_fit([monitor], lambda: module, max_epochs=1)
    assert "similarity/intertwiner/net.1" in monitor.history[-1]
    assert "| net.1 | gelu |" in monitor.table()


class MyReLU6(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.minimum(torch.relu(x), torch.tensor(6.0))


class MyLeakyReLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.maximum(x, 0.1 * x)


@pytest.mark.parametrize(
    ("module", "group"),
    [
        (nn.ReLU6(), "gelu"),
        (MyReLU6(), "gelu"),
        (nn.Hardtanh(), "tanh"),
        (nn.Hardtanh(-3.0, 3.0), "tanh"),
        (nn.Hardtanh(-1.0, 2.0), "gelu"),
        (nn.Hardtanh(-math.inf, 0.0), "relu"),
        (nn.Hardtanh(-2.0, math.inf), "gelu"),
        (nn.LeakyReLU(0.01), "relu"),
        (MyLeakyReLU(), "relu"),
    ],
    ids=str,
)
def test_relu6_hardtanh_and_leaky_relu_get_the_group_of_their_symmetries(module: nn.Module, group: str) -> None:
    """Found: ReLU6, Hardtanh and a hand-written LeakyReLU were not recognised, so ``layers=None`` left them out."""
    assert recognised_activation(module) == group


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (0.0, 6.0),
        (-1.0, 1.0),
        (-0.5, 0.5),
        (-1.0, 2.0),
        (0.0, math.inf),
        (-math.inf, 0.0),
        (-2.0, math.inf),
        (1.0, 3.0),
    ],
)
def test_the_group_of_a_clamp_holds_exactly_the_maps_that_commute_with_it(low: float, high: float) -> None:
    """Godfrey et al.'s rule G_sigma = {A : sigma o A = B o sigma}, checked on a unit: the positive scaling ``A = c``
    is in it when ``sigma(c x) = c sigma(x)`` (then ``B = c``), the sign flip ``A = -1`` when ``sigma(-x) =
    -sigma(x)``; the permutations always are. "relu" is the permutations times the scalings, "tanh" the signed
    permutations, "gelu" the permutations alone."""
    x = torch.linspace(-20.0, 20.0, 4001, dtype=torch.float64)

    def sigma(values: Tensor) -> Tensor:
        return values.clamp(low, high)

    scalings = all(torch.allclose(sigma(c * x), c * sigma(x)) for c in (0.5, 2.0, 3.0))
    signs = torch.allclose(sigma(-x), -sigma(x))
    assert not (scalings and signs)  # both only for the identity, which is no clamp
    expected = "relu" if scalings else "tanh" if signs else "gelu"
    assert clamp_group(low, high) == expected
    assert recognised_activation(nn.Hardtanh(low, high)) == expected


@pytest.mark.parametrize(("activation", "group"), [(nn.ReLU6, "gelu"), (nn.Hardtanh, "tanh"), (MyReLU6, "gelu")])
def test_the_callback_compares_relu6_and_hardtanh_up_to_their_groups(activation, group: str) -> None:
    module = TinyClassifier(num_samples=64, shuffle=False)
    module.net[2] = activation()
    monitor = RepresentationSimilarity(num_examples=32)
    seeded_fit([monitor], lambda: module, max_epochs=1)
    assert "similarity/intertwiner/net.2" in monitor.history[-1]
    assert f"| net.2 | {group} |" in monitor.table()


class _WithReLU6(TinyClassifier):
    """``TinyClassifier`` with a ReLU6 before its Tanh: a layer an older version did not compare."""

    def __init__(self) -> None:
        super().__init__(num_samples=64, shuffle=False)
        self.net[1] = nn.ReLU6()


def test_a_run_resumed_from_a_reference_without_the_relu6_layer_compares_the_layers_it_has(tmp_path) -> None:
    """A checkpoint whose reference features an older version recorded: no ReLU6 features (found: the resumed fit
    failed with a KeyError on ``net.1``)."""
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = RepresentationSimilarity(num_examples=32)
    seeded_fit([first, saver], _WithReLU6, max_epochs=1, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    state = saved["callbacks"][first.state_key]
    assert set(state["reference_features"]) == {"net.1", "net.2"}
    del state["reference_features"]["net.1"]  # as the older version saved it
    state["history"] = [{k: v for k, v in entry.items() if "/net.1" not in k} for entry in state["history"]]
    torch.save(saved, tmp_path / "older.ckpt")
    resumed = RepresentationSimilarity(num_examples=32)
    with pytest.warns(UserWarning, match=r"the reference has no features of \['net\.1'\]"):
        tiny_trainer(None, callbacks=[resumed], max_epochs=2).fit(_WithReLU6(), ckpt_path=str(tmp_path / "older.ckpt"))
    assert len(resumed.history) == 2 and "similarity/cka/net.1" not in resumed.history[-1]
    assert 0 < resumed.history[-1]["similarity/cka/net.2"] <= 1
