import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nt.common.validation import ArgumentError
from lightning_nt.gradinit import ScaleAdam, apply_scales, gradinit, search_mode
from lightning_nt.gradinit.core import loss_of_substituted
from tests.gradinit.reference import reference_gradinit


def _conv_net(seed=0, depth=3):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 10))


def _batches(seed=0, size=16):
    generator = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(size, 1, 8, 8, generator=generator), torch.randint(10, (size,), generator=generator))
        for _ in range(20)
    ]
    return itertools.cycle(data)


def _loss(module, batch):
    return F.cross_entropy(module(batch[0]), batch[1])


def test_scale_gradient_is_the_inner_product_with_the_initial_weights():
    net = _conv_net()
    batch = next(_batches())
    theta0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    alpha = torch.ones(len(theta0), requires_grad=True)
    weights = {n: a * t for a, (n, t) in zip(alpha, theta0.items())}
    (scale_grad,) = torch.autograd.grad(loss_of_substituted(net, _loss, weights, batch), alpha)
    grads = torch.autograd.grad(_loss(net, batch), list(net.parameters()))
    expected = torch.stack([(g * t).sum() for g, t in zip(grads, theta0.values())])
    torch.testing.assert_close(scale_grad, expected)


@pytest.mark.parametrize("algorithm", ["sgd", "adam"])
def test_equals_an_independent_implementation_of_the_published_algorithm(algorithm):
    gamma = 0.4 if algorithm == "sgd" else 20.0
    eta = 0.1 if algorithm == "sgd" else 1e-3
    ours = gradinit(_conv_net(), _loss, _batches(), iterations=60, lr=1e-2, eta=eta, gamma=gamma, algorithm=algorithm)
    theirs = reference_gradinit(
        _conv_net(), _batches(), 60, lr=1e-2, eta=eta, gamma=gamma, min_scale=0.01, algorithm=algorithm
    )
    assert 0 < ours.constraint_iterations < 60  # both branches were exercised
    torch.testing.assert_close(torch.tensor(list(ours.scales.values())), torch.tensor(theirs), rtol=0, atol=1e-5)


def test_module_is_untouched_until_the_scales_are_applied():
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    before = copy.deepcopy(net.state_dict())
    identities = [id(p) for p in net.parameters()]
    data = itertools.cycle([(torch.randn(8, 4), torch.randint(3, (8,))) for _ in range(4)])
    with search_mode(net):
        assert not net[2].training and net[1].training and not net[1].track_running_stats
        result = gradinit(net, _loss, data, iterations=10, eta=0.1)
    assert net.training and net[1].track_running_stats and net[2].training
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name  # BN running stats untouched too
    apply_scales(net, result.scales)
    assert [id(p) for p in net.parameters()] == identities and net.state_dict().keys() == before.keys()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), before[name] * result.scales[name])


def test_clamps_and_zero_norm_tensors():
    net = _conv_net()
    with torch.no_grad():
        net[0].bias.zero_()
    result = gradinit(net, _loss, _batches(), iterations=40, lr=0.5, eta=0.1, gamma=1e-3, min_scale=0.3, max_scale=0.5)
    weights = {n: s for n, s in result.scales.items() if n.endswith("weight")}
    biases = {n: s for n, s in result.scales.items() if n.endswith("bias")}
    assert all(0.3 <= s <= 0.5 for s in weights.values())
    assert all(s >= 0.0 for s in biases.values())
    assert result.scales["0.bias"] == 1.0  # zero norm: untouched
    assert min(weights.values()) == pytest.approx(0.3)  # the tight constraint pushes weights to the floor


def test_constraint_branch_fires_above_gamma_and_lowers_the_norm():
    result = gradinit(_conv_net(), _loss, _batches(), iterations=30, lr=0.05, eta=0.1, gamma=1e-2)
    assert result.constraint_iterations == 30 and not result.lookahead_losses
    assert result.grad_norms[-1] < 0.8 * result.grad_norms[0]


def test_objective_branch_lowers_the_lookahead_loss():
    result = gradinit(_conv_net(depth=6), _loss, _batches(), iterations=80, lr=5e-2, eta=0.1, gamma=100.0)
    assert result.constraint_iterations == 0
    first, last = sum(result.lookahead_losses[:5]) / 5, sum(result.lookahead_losses[-5:]) / 5
    assert last < first


def test_divergence_is_reported():
    def exploding(module, batch):
        return _loss(module, batch) * float("inf")

    result = gradinit(_conv_net(), exploding, _batches(), iterations=5)
    assert result.diverged and result.scales == {}


def test_scale_adam_bounds():
    optimizer = ScaleAdam(
        torch.tensor([0.1, 0.0]), torch.tensor([2.0, float("inf")]), torch.tensor([False, True]), lr=1.0
    )
    scales = optimizer.step(torch.ones(2), torch.tensor([5.0, 5.0]), constraint=True)
    assert scales.tolist() == [pytest.approx(0.1), 1.0]


def test_bad_algorithm():
    with pytest.raises(ValueError, match="algorithm"):
        gradinit(_conv_net(), _loss, _batches(), iterations=1, algorithm="lamb")


class _SharedAndTied(nn.Module):
    """A block registered under two names (applied twice) and a head whose weight is also registered in ``tail``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block = self.again = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * 8 * 8, 10)
        self.tail = nn.Linear(8 * 8 * 8, 10)  # never called; holds the head's weight too
        self.tail.weight = self.head.weight

    def forward(self, images):
        return self.head(self.again(self.block(self.stem(images))).flatten(1))


def test_shared_and_tied_parameters_keep_their_identity_get_one_scale_and_train():
    net = _SharedAndTied()
    parameters = list(net.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.01)
    result = gradinit(net, _loss, _batches(), iterations=6, lr=0.05, eta=0.1, gamma=0.5)
    names = ["stem.0.weight", "stem.0.bias", "block.0.weight", "block.0.bias", "head.weight", "head.bias", "tail.bias"]
    assert list(result.scales) == names and result.unused == ["tail.bias"]
    assert net.block is net.again and net.tail.weight is net.head.weight and list(net.parameters()) == parameters
    assert all(type(p) is nn.Parameter for m in net.modules() for p in m._parameters.values())
    before = copy.deepcopy(net.state_dict())
    apply_scales(net, result.scales)
    torch.testing.assert_close(net.again[0].weight, before["block.0.weight"] * result.scales["block.0.weight"])
    torch.testing.assert_close(net.tail.weight, before["head.weight"] * result.scales["head.weight"])
    for _ in range(2):  # the optimizer's parameters are the ones the forward uses
        optimizer.zero_grad()
        _loss(net, next(_batches())).backward()
        optimizer.step()
    assert all(p.grad is not None for p in parameters if p is not net.tail.bias)


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _conv_net()
        self.unused = nn.Linear(3, 3)

    def forward(self, images):
        return self.net(images)


def test_an_unused_parameter_keeps_scale_one():
    result = gradinit(_WithUnused(), _loss, _batches(), iterations=10, lr=0.05, eta=0.1, gamma=1e-3, max_scale=0.5)
    assert result.unused == ["unused.weight", "unused.bias"]
    assert result.scales["unused.weight"] == 1.0 and result.scales["unused.bias"] == 1.0  # even above max_scale
    assert result.scales["net.0.weight"] <= 0.5


def test_lookahead_loss_start_and_end_whichever_branch():
    objective = gradinit(_conv_net(), _loss, _batches(), iterations=20, lr=0.05, eta=0.1, gamma=100.0)
    assert objective.lookahead_loss_start == pytest.approx(objective.lookahead_losses[0], rel=1e-6)  # same batches
    assert objective.lookahead_loss_end < objective.lookahead_loss_start
    constraint = gradinit(_conv_net(), _loss, _batches(), iterations=5, lr=0.05, eta=0.1, gamma=1e-6)
    assert constraint.constraint_iterations == 5 and not constraint.lookahead_losses
    assert math.isfinite(constraint.lookahead_loss_start) and math.isfinite(constraint.lookahead_loss_end)
    assert constraint.lookahead_loss_end != constraint.lookahead_loss_start


def test_probing_does_not_change_the_batches_the_search_sees():
    seen = []

    def recording(module, batch):
        seen.append(batch[1].tolist())
        return _loss(module, batch)

    gradinit(_conv_net(), recording, _batches(), iterations=3, gamma=100.0)
    data = [b[1].tolist() for b in itertools.islice(_batches(), 9)]
    probe = [data[0] + data[1], data[0] + data[2]]
    search = [data[i] + data[j] for i, j in ((0, 1), (0, 2), (3, 4), (3, 5), (6, 7), (6, 8))]  # as without probing
    assert seen[:2] == probe and seen[2:-2] == search and seen[-2:] == probe


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("iterations", "3"),
        ("iterations", 0),
        ("lr", math.nan),
        ("eta", 0.0),
        ("gamma", math.inf),
        ("algorithm", "lamb"),
        ("normalize_grad", "no"),
        ("min_scale", -1.0),
        ("max_scale", 0.001),
        ("grad_clip", -1.0),
        ("batch_overlap", 1),
        ("second_order", "yes"),
        ("concatenate", "cat"),
        ("reduce_mean", 3),
        ("progress", [print]),
    ],
)
def test_gradinit_refuses_bad_arguments_naming_them(argument, value):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        gradinit(_conv_net(), _loss, _batches(), **{"iterations": 1, argument: value})


@pytest.mark.parametrize(
    ("argument", "value"),
    [("lr", 0.0), ("lr", "0.1"), ("betas", (0.9, 1.0)), ("betas", (0.9,)), ("eps", math.nan), ("grad_clip", -1.0)],
)
def test_scale_adam_refuses_bad_arguments_naming_them(argument, value):
    bounds = {"lower": torch.zeros(2), "upper": torch.ones(2), "frozen": torch.zeros(2, dtype=torch.bool)}
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        ScaleAdam(**bounds, **({"lr": 0.1} | {argument: value}))
