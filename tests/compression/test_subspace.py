import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lightning_nt.compression.subspace import (
    detached_deepcopy,
    find_subspace,
    subspace_mismatches,
    subspace_originals,
    to_subspace,
)
from tests.compression.models import AttentionClassifier, FrozenFirstLayer, LSTMClassifier, TiedClassifier


def _net():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_only_w_trains_and_theta0_is_the_seeded_initialisation():
    net = _net()
    subspace = to_subspace(net, dimension=12, seed=5)
    assert [p for p in net.parameters() if p.requires_grad] == [subspace.weight]
    reference = _net()
    torch.manual_seed(5)
    for module in reference.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    inputs = torch.randn(4, 6)
    torch.testing.assert_close(net(inputs), reference(inputs), rtol=0, atol=0)


def test_displacement_is_the_kronecker_projection_of_w():
    net = _net()
    subspace = to_subspace(net, dimension=10, seed=0)
    with torch.no_grad():
        subspace.weight.copy_(torch.randn(10))
    rows, columns = subspace.factors
    padded = torch.cat([subspace.weight.detach(), torch.zeros(rows * columns - 10)])
    theta0 = net[0].parametrizations.weight.original
    left, right = subspace.left_0, subspace.right_0
    expected = (torch.kron(left, right) @ padded)[: theta0.numel()].view_as(theta0)
    torch.testing.assert_close(net[0].weight - theta0, expected)


def test_columns_of_p_have_unit_norm_on_average():
    net = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    subspace = to_subspace(net, dimension=64, seed=1)
    squared_norms = []
    for j in range(64):
        with torch.no_grad():
            subspace.weight.zero_()
            subspace.weight[j] = 1.0
        squared_norms.append(sum(float(subspace.offset(i).detach().pow(2).sum()) for i in range(4)))
    assert sum(squared_norms) / 64 == pytest.approx(1.0, rel=0.2)


def test_projection_is_checked_against_its_seed():
    subspace = to_subspace(_net(), dimension=8, seed=3)
    assert subspace.projections_match_seed()
    with torch.no_grad():
        subspace.left_1.mul_(1.0001)
    assert not subspace.projections_match_seed()


def test_training_moves_only_w_and_lowers_the_loss():
    net = _net()
    subspace = to_subspace(net, dimension=20, seed=0)
    theta0 = [p.detach().clone() for p in net.parameters() if not p.requires_grad]
    inputs, labels = torch.randn(64, 6), torch.randint(3, (64,))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    losses = []
    for _ in range(50):
        loss = nn.functional.cross_entropy(net(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]
    assert all(torch.equal(a, b) for a, b in zip(theta0, (p for p in net.parameters() if not p.requires_grad)))
    assert find_subspace(net) is subspace and float(subspace.weight.norm()) > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="`dimension`"):
        to_subspace(_net(), dimension=0)
    with pytest.raises(ValueError, match="`seed`"):
        to_subspace(_net(), dimension=3, seed=2**32)
    net = _net()
    to_subspace(net, dimension=3)
    with pytest.raises(ValueError, match="already"):
        to_subspace(net, dimension=3)
    assert math.isfinite(float(net(torch.zeros(1, 6)).sum()))


class WithLooseParameter(nn.Module):
    """A parameter outside any module with ``reset_parameters``: the seed can't draw it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.temperature = nn.Parameter(torch.ones(1))


def test_a_parameter_the_seed_cannot_draw_is_named_and_the_module_left_untouched():
    module = WithLooseParameter()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="temperature"):
        to_subspace(module, dimension=4)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="parametrizations"):
        to_subspace(normed, dimension=4)


def test_mismatches_with_the_seed_are_found_and_casts_are_not_mismatches():
    net = _net()
    to_subspace(net, dimension=6, seed=2)
    assert subspace_mismatches(net) == []
    assert subspace_mismatches(net.to(torch.bfloat16)) == []  # what precision="bf16-true" does
    double = _net()
    to_subspace(double, dimension=6, seed=2)
    assert subspace_mismatches(double.double()) == []  # what precision="64-true" does (after the fp32 draw)
    assert subspace_mismatches(net.float()) == ["projection P", "0.weight", "0.bias", "2.weight", "2.bias"]  # rounded
    net = _net()
    to_subspace(net, dimension=6, seed=2)
    other = _net()
    to_subspace(other, dimension=6, seed=3)
    net.load_state_dict(other.state_dict())  # theta0 of another seed, as from its checkpoint
    assert subspace_mismatches(net) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert math.isfinite(float(net(torch.zeros(1, 6)).sum()))


def test_a_shared_parameter_stays_shared_and_moves_in_every_module_holding_it():
    model = TiedClassifier()
    subspace = to_subspace(model, dimension=8, seed=1)
    theta0 = model.embedding.parametrizations.weight.original
    assert model.head.parametrizations.weight.original is theta0
    with torch.no_grad():
        subspace.weight.normal_()
    assert torch.equal(model.head.weight, model.embedding.weight)
    assert not torch.equal(model.head.weight, theta0)
    assert subspace_mismatches(model) == []


def test_frozen_parameters_stay_outside_the_subspace_with_their_values():
    model = FrozenFirstLayer()
    pretrained = {name: p.detach().clone() for name, p in model.net[0].named_parameters()}
    subspace = to_subspace(model, dimension=6, seed=0)
    assert not parametrize.is_parametrized(model.net[0])
    assert all(torch.equal(p, pretrained[name]) and not p.requires_grad for name, p in model.net[0].named_parameters())
    assert [p for p in model.parameters() if p.requires_grad] == [subspace.weight]
    assert len(subspace._numels) == 2 and subspace_mismatches(model) == []  # net.3.weight, net.3.bias
    with pytest.raises(ValueError, match="no trainable parameter"):
        to_subspace(nn.Linear(2, 2).requires_grad_(False), dimension=3)


def _train(model, steps=30):
    inputs, labels = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def plain_multihead_attention(monkeypatch):
    """``nn.MultiheadAttention`` as a user has it: Lightning's demo transformer (imported by tests.helpers) gives it
    a ``reset_parameters`` alias of ``_reset_parameters``."""
    monkeypatch.delattr(nn.MultiheadAttention, "reset_parameters", raising=False)


def test_multihead_attention_is_drawn_by_its_own_initialiser_and_trains(plain_multihead_attention):
    torch.manual_seed(0)
    model = AttentionClassifier()
    to_subspace(model, dimension=12, seed=4)
    attention = model.encoder.layers[0].self_attn
    for original in (
        attention.parametrizations.in_proj_bias.original,
        attention.out_proj.parametrizations.bias.original,
    ):
        assert torch.equal(original, torch.zeros_like(original))  # zeroed by _reset_parameters, as at construction
    losses = _train(model)
    assert losses[-1] < losses[0] - 0.02
    assert subspace_mismatches(model) == []


def test_an_lstm_in_a_subspace_can_be_checked_against_its_seed():
    torch.manual_seed(0)
    model = LSTMClassifier()
    to_subspace(model, dimension=12, seed=4)
    losses = _train(model, steps=5)  # the LSTM now caches weights computed with autograd
    assert losses[-1] < losses[0]
    assert subspace_mismatches(model) == []


def test_a_lazy_module_is_refused_naming_the_parameters_and_the_fix():
    # was "Attempted to use an uninitialized parameter in <method 'fill_'>" from inside the seeded draw
    net = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"\['0.weight', '0.bias'\] are not materialised .* Run the module once"):
        to_subspace(net, dimension=3)
    net(torch.zeros(1, 5))
    to_subspace(net, dimension=3)
    assert subspace_mismatches(net) == []


def test_a_float64_module_trains_its_coordinates_in_float64():
    # w was float32: Lightning restores a checkpoint before precision="64-true" converts the module, so a resumed
    # run read its float64 w through float32 and was not the uninterrupted run
    net = _net().double()
    subspace = to_subspace(net, dimension=6, seed=2)
    assert subspace.weight.dtype == torch.float64 and subspace_mismatches(net) == []
    assert net(torch.zeros(1, 6, dtype=torch.float64)).dtype == torch.float64


def test_the_old_weight_norm_hook_is_refused_as_a_parametrization():
    # was "Parameters ['0.weight_g', '0.weight_v'] don't belong to a module with `reset_parameters`" (they do)
    net = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        nn.utils.weight_norm(net[0])
    with pytest.raises(ValueError, match=r"\['0'\] already carry parametrizations .*weight_norm"):
        to_subspace(net, dimension=4)


class _TransposedLinear(nn.Module):
    """``transformers``' ``Conv1D``: a linear layer with its weight stored ``[in, out]`` and no ``reset_parameters``."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs))
        self.bias = nn.Parameter(torch.randn(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


class _GPTLikeHead(nn.Module):
    """Two ``Conv1D``s, an ``nn.Linear`` (which has ``reset_parameters``) and a bare logit scale of the model itself."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_TransposedLinear(6, 8), nn.ReLU(), _TransposedLinear(8, 8))
        self.head = nn.Linear(8, 3)
        self.logit_scale = nn.Parameter(torch.tensor(5.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x)) * self.logit_scale


def _gpt2_init(module: nn.Module) -> None:
    """GPT-2's ``_init_weights`` for the layers above (normal(0, 0.02) weights, zero biases), and log(1/0.07) for the
    model's own logit scale, as CLIP initialises it."""
    if isinstance(module, _TransposedLinear | nn.Linear):
        module.weight.data.normal_(0.0, 0.02)
        module.bias.data.zero_()
    elif isinstance(module, _GPTLikeHead):
        module.logit_scale.data.fill_(math.log(1 / 0.07))


def test_an_initializer_draws_theta0_for_layers_without_reset_parameters():
    """theta0 is the initializer's draw under the seed, children first (the order the modules' constructors run),
    against a draw written out by hand; without it the same module is refused, naming the fix."""
    with pytest.raises(ValueError, match=r"(?s)blocks\.0\.weight.*`initializer`"):
        to_subspace(_GPTLikeHead(), dimension=5, seed=3)
    net = _GPTLikeHead()
    subspace = to_subspace(net, dimension=5, seed=3, initializer=_gpt2_init)
    assert [p for p in net.parameters() if p.requires_grad] == [subspace.weight]
    torch.manual_seed(3)
    first = torch.empty(6, 8).normal_(0.0, 0.02)
    second = torch.empty(8, 8).normal_(0.0, 0.02)
    head = torch.empty(3, 8).normal_(0.0, 0.02)
    expected = {
        "blocks.0.weight": first,
        "blocks.0.bias": torch.zeros(8),
        "blocks.2.weight": second,
        "blocks.2.bias": torch.zeros(8),
        "head.weight": head,
        "head.bias": torch.zeros(3),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
    }
    originals = dict(subspace_originals(net))
    assert originals.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(originals[name], value), name
    assert subspace_mismatches(net) == []  # the report's decoder draws theta0 with the same initializer
    with torch.no_grad():
        originals["blocks.2.weight"].add_(1e-3)
    assert subspace_mismatches(net) == ["blocks.2.weight"]


def test_an_initializer_that_skips_a_parameter_is_named_and_the_module_left_untouched():
    def linear_only(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.reset_parameters()

    net = _GPTLikeHead()
    before = {name: value.clone() for name, value in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"`initializer` left parameters \[.*'blocks\.0\.weight'"):
        to_subspace(net, dimension=5, initializer=linear_only)
    assert all(torch.equal(value, before[name]) for name, value in net.state_dict().items())
    assert find_subspace(net) is None


def test_a_copy_runs_its_own_bound_methods_kept_as_attributes():
    """A module that keeps a bound method of itself (``self.impl = self._eager``): the copy's is bound to the copy, so
    a measurement on the copy (the path norm squares the copy's weights) runs the copy's weights."""

    class Dispatching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.impl = self._eager

        def _eager(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.impl(x)

    original = Dispatching()
    copy = detached_deepcopy(original)
    assert copy.impl.__self__ is copy
    with torch.no_grad():
        copy.fc.weight.zero_()
        copy.fc.bias.zero_()
    assert torch.equal(copy(torch.ones(2, 3)), torch.zeros(2, 3))


def test_an_initializer_that_does_not_draw_from_the_seed_is_refused():
    """Copied pretrained values don't change with the seed: the code would not count them."""
    pretrained = {tuple(p.shape): torch.randn(p.shape) for p in _GPTLikeHead().parameters()}

    def copy_pretrained(module: nn.Module) -> None:
        for parameter in module.parameters(recurse=False):
            parameter.data.copy_(pretrained[tuple(parameter.shape)])

    with pytest.raises(ValueError, match=r"`initializer` sets \[.*'blocks\.0\.weight'.*don't change with the seed"):
        to_subspace(_GPTLikeHead(), dimension=4, initializer=copy_pretrained)


def test_an_initializer_drawing_from_numpy_or_python_is_reproducible_from_the_seed():
    """Python's and NumPy's generators are seeded too: theta0 is the same whatever their state before, and the
    report's decoder finds no mismatch after their state moved on."""

    def from_numpy(module: nn.Module) -> None:
        for parameter in module.parameters(recurse=False):
            parameter.data.copy_(torch.from_numpy(np.random.standard_normal(tuple(parameter.shape))) * 0.02)

    first, second = _GPTLikeHead(), _GPTLikeHead()
    np.random.seed(1)
    to_subspace(first, dimension=4, seed=7, initializer=from_numpy)
    np.random.seed(2)
    to_subspace(second, dimension=4, seed=7, initializer=from_numpy)
    for (name, a), (_, b) in zip(subspace_originals(first), subspace_originals(second), strict=True):
        assert torch.equal(a, b), name
    np.random.seed(3)
    assert subspace_mismatches(first) == []


def test_an_initializer_runs_on_parents_too_as_module_apply_does():
    """GPT-2's ``_init_weights`` rescales ``c_proj.weight`` when called on its parent block (which owns no parameter
    itself): the draw is ``module.apply(initializer)``'s under the seed."""

    def gpt2_like(module: nn.Module) -> None:
        _gpt2_init(module)
        if isinstance(module, nn.Sequential):  # the parent block, which owns no parameter itself
            module[2].weight.data.mul_(0.5)

    net = _GPTLikeHead()
    to_subspace(net, dimension=4, seed=3, initializer=gpt2_like)
    reference = _GPTLikeHead()
    torch.manual_seed(3)
    reference.apply(gpt2_like)
    drawn = dict(subspace_originals(net))
    for name, value in reference.named_parameters():
        assert torch.equal(drawn[name], value.detach()), name
