import math
import random

import pytest
import torch
from torch import nn

from lightning_nt.compression.capacity import (
    BISECTION_STEPS,
    SIGMA_RANGE,
    capacity_measures,
    classification_margins,
    r_norm,
)


def two_layer(bias=True):
    return nn.Sequential(nn.Linear(3, 5, bias=bias), nn.ReLU(), nn.Linear(5, 4, bias=bias))


def measure(net, x, labels=None, **kwargs):
    if labels is None:
        with torch.no_grad():
            labels = net(x).argmax(dim=1)
    kwargs.setdefault("num_sharpness_samples", 2)
    return capacity_measures(net, lambda: net(x), labels, inputs=x, **kwargs)


def test_num_params_counts_trainable_parameters():
    net = two_layer()
    net[0].bias.requires_grad_(False)
    scalars, _ = measure(net, torch.randn(4, 3))
    assert scalars["num_params"] == 3 * 5 + 5 * 4 + 4


def test_weight_norms_of_linear_and_conv_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4))
    scalars, _ = measure(net, torch.randn(5, 2, 4, 4))
    spectral, frobenius, frobenius_sq = 0.0, 0.0, 0.0
    for weight in (net[0].weight.detach().reshape(3, 18), net[3].weight.detach()):
        spectral += math.log(float(torch.linalg.svdvals(weight.double())[0]))
        squares = sum(float(w) ** 2 for w in weight.flatten())
        frobenius += 0.5 * math.log(squares)
        frobenius_sq += squares
    assert scalars["log_spectral_product"] == pytest.approx(spectral, rel=1e-9)
    assert scalars["log_frobenius_product"] == pytest.approx(frobenius, rel=1e-6)
    assert scalars["sum_frobenius_sq"] == pytest.approx(frobenius_sq, rel=1e-6)


def test_distance_from_init_over_the_named_parameters():
    torch.manual_seed(1)
    net = two_layer()
    initial = {name: p.detach().clone() for name, p in net.named_parameters()}
    with torch.no_grad():
        net[0].weight.add_(0.3)
        net[2].bias.sub_(torch.tensor([1.0, 2.0, 0.0, 0.0]))
    x = torch.randn(6, 3)
    scalars, skipped = measure(net, x, initial_parameters=initial)
    assert scalars["distance_from_init"] == pytest.approx(math.sqrt(15 * 0.09 + 1 + 4), rel=1e-6)
    partial, _ = measure(net, x, initial_parameters={"2.bias": initial["2.bias"]})
    assert partial["distance_from_init"] == pytest.approx(math.sqrt(5), rel=1e-6)
    none, skipped = measure(net, x)
    assert "distance_from_init" not in none and "pacbayes_bound_term" not in none
    assert any(reason.startswith("distance_from_init") for reason in skipped)


def test_path_norm_is_the_sum_over_paths_of_squared_weights():
    torch.manual_seed(2)
    net = two_layer()
    w1, b1, w2, b2 = (p.detach() for p in net.parameters())
    expected = 0.0
    for k in range(4):
        expected += float(b2[k]) ** 2
        for j in range(5):
            into_j = float(b1[j]) ** 2 + sum(float(w1[j, i]) ** 2 for i in range(3))
            expected += float(w2[k, j]) ** 2 * into_j
    scalars, _ = measure(net, torch.randn(7, 3))
    assert scalars["path_norm"] == pytest.approx(expected, rel=1e-5)


def test_path_norm_needs_inputs_and_a_working_forward():
    net, x = two_layer(), torch.randn(4, 3)
    labels = torch.zeros(4, dtype=torch.long)
    scalars, skipped = capacity_measures(net, lambda: net(x), labels, num_sharpness_samples=1)
    assert "path_norm" not in scalars and any(reason.startswith("path_norm") for reason in skipped)
    scalars, skipped = capacity_measures(net, lambda: net(x), labels, inputs=torch.randn(4, 7), num_sharpness_samples=1)
    assert "path_norm" not in scalars and any("RuntimeError" in reason for reason in skipped)


def test_margin_is_the_tenth_percentile():
    torch.manual_seed(3)
    net, x = two_layer(), torch.randn(23, 3)
    labels = torch.randint(0, 4, (23,))
    logits = net(x).detach()
    margins = sorted(
        float(row[label]) - max(float(v) for j, v in enumerate(row) if j != label) for row, label in zip(logits, labels)
    )
    position = 0.1 * (len(margins) - 1)
    low = math.floor(position)
    expected = margins[low] + (position - low) * (margins[low + 1] - margins[low])
    scalars, _ = measure(net, x, labels)
    assert scalars["margin"] == pytest.approx(expected, rel=1e-6)
    assert sorted(classification_margins(logits, labels).tolist()) == pytest.approx(margins)


def test_f1_path_norm_of_a_two_layer_relu_net():
    torch.manual_seed(4)
    for bias in (True, False):
        net = two_layer(bias)
        w1, w2 = net[0].weight.detach(), net[2].weight.detach()
        expected = 0.0
        for k in range(5):
            row = [float(v) for v in w1[k]] + ([float(net[0].bias.detach()[k])] if bias else [])
            expected += math.sqrt(sum(v * v for v in row)) * math.sqrt(sum(float(a) ** 2 for a in w2[:, k]))
        scalars, _ = measure(net, torch.randn(4, 3))
        assert scalars["f1_path_norm"] == pytest.approx(expected, rel=1e-6)


def test_r_norm_is_skipped_for_other_architectures():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    scalars, skipped = measure(net, torch.randn(4, 3))
    assert "r_norm" not in scalars and "f1_path_norm" not in scalars
    assert any(reason.startswith("r_norm, f1_path_norm") for reason in skipped)


class ConstantLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return torch.tensor([1.0, 0.0]) + 0 * self.fc(x)


def test_sharpness_search_stops_at_its_upper_limit_when_noise_changes_nothing():
    net, x = ConstantLogits(), torch.randn(8, 3)
    scalars, skipped = measure(net, x, torch.zeros(8, dtype=torch.long))
    assert scalars["pacbayes_sigma"] == SIGMA_RANGE[1]
    assert scalars["pacbayes_flatness"] == pytest.approx(SIGMA_RANGE[1] ** -2)
    assert any(reason.startswith("pacbayes_sigma") for reason in skipped)


def test_sharpness_sigma_scales_with_the_weights_of_a_linear_classifier():
    # error(W + sigma Z) = error(10 W + 10 sigma Z) for the same draws Z: sigma scales by 10, up to the bisection grid
    torch.manual_seed(5)
    sharp, x = nn.Linear(6, 3, bias=False), torch.randn(64, 6)
    flat = nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        flat.weight.copy_(10 * sharp.weight)
    labels = sharp(x).argmax(dim=1)
    sigmas = [
        measure(net, x, labels, num_sharpness_samples=4, generator=torch.Generator().manual_seed(0))[0][
            "pacbayes_sigma"
        ]
        for net in (sharp, flat)
    ]
    assert SIGMA_RANGE[0] < sigmas[0] < sigmas[1] < SIGMA_RANGE[1]
    assert sigmas[1] / sigmas[0] == pytest.approx(10, rel=0.01)


def test_sharpness_sigma_is_where_the_noisy_error_crosses_the_target():
    torch.manual_seed(9)
    net, x = nn.Linear(6, 3, bias=False), torch.randn(64, 6)
    labels = net(x).argmax(dim=1)
    scalars, _ = measure(net, x, labels, num_sharpness_samples=3, generator=torch.Generator().manual_seed(0))
    sigma = scalars["pacbayes_sigma"]
    # the documented scheme: one seed per sample from `generator`, the same draws at every sigma
    seeds = torch.randint(0, 2**62, (3,), generator=torch.Generator().manual_seed(0)).tolist()
    draws = [torch.randn(net.weight.shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds]

    def noisy_error(s):
        return sum(float(((x @ (net.weight + s * z).T).argmax(1) != labels).double().mean()) for z in draws) / 3

    step = math.exp((math.log(SIGMA_RANGE[1]) - math.log(SIGMA_RANGE[0])) / 2**BISECTION_STEPS)
    assert noisy_error(sigma) <= 0.1 < noisy_error(sigma * step)


def test_pacbayes_bound_term():
    torch.manual_seed(6)
    net, x = two_layer(), torch.randn(16, 3)
    initial = {name: p.detach() + 0.1 for name, p in net.named_parameters()}
    scalars, _ = measure(net, x, initial_parameters=initial)
    sigma, distance = scalars["pacbayes_sigma"], scalars["distance_from_init"]
    assert distance == pytest.approx(0.1 * math.sqrt(3 * 5 + 5 + 5 * 4 + 4), rel=1e-5)
    assert scalars["pacbayes_bound_term"] == pytest.approx(distance**2 / (4 * sigma**2) + math.log(16 / sigma) + 10)


def test_state_is_left_exactly_as_found():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 4)).train()
    x = torch.randn(10, 3)
    net(x).square().sum().backward()
    state = {name: value.clone() for name, value in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    rng, python_rng = torch.get_rng_state(), random.getstate()
    measure(net, x, torch.zeros(10, dtype=torch.long), initial_parameters=state)
    assert all(torch.equal(value, state[name]) for name, value in net.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert all(m.training for m in net.modules())
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == python_rng


def test_generator_makes_the_measures_reproducible():
    torch.manual_seed(8)
    net, x = two_layer(), torch.randn(32, 3)
    labels = torch.randint(0, 4, (32,))
    runs = [
        measure(net, x, labels, sharpness_target=0.05, generator=torch.Generator().manual_seed(seed))
        for seed in (0, 0, 1)
    ]
    assert runs[0] == runs[1]
    assert runs[0][0]["pacbayes_sigma"] != runs[2][0]["pacbayes_sigma"]


def test_bad_arguments():
    net, x = two_layer(), torch.randn(2, 3)
    with pytest.raises(ValueError, match="sharpness_target"):
        capacity_measures(net, lambda: net(x), torch.zeros(2, dtype=torch.long), sharpness_target=0.0)


def test_two_layer_norms_read_a_lightning_module_and_a_subspace_model():
    from lightning_nt.compression import to_subspace
    from lightning_nt.demos import DigitsMLP

    model = DigitsMLP(hidden=16)  # Flatten and torchmetrics modules around the two Linear layers
    to_subspace(model, dimension=10)
    with torch.no_grad():
        model.network[1].parametrizations.weight[0].subspace.weight.normal_()
    inputs, labels = torch.randn(8, 1, 8, 8), torch.randint(10, (8,))
    scalars, _ = capacity_measures(model, lambda: model(inputs), labels, inputs=inputs)
    first, second = model.network[1], model.network[3]
    rows = torch.cat([first.weight, first.bias[:, None]], dim=1).detach()
    expected = float((second.weight.detach().norm(dim=0) * rows.norm(dim=1)).sum())
    assert scalars["f1_path_norm"] == pytest.approx(expected, rel=1e-5)
    weights, outgoing = first.weight.detach(), second.weight.detach().T
    assert scalars["r_norm"] == pytest.approx(r_norm(weights, first.bias.detach(), outgoing), rel=1e-9)


def test_sharpness_follows_the_loss_when_one_is_given():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(3, (32,))
    by_error, _ = capacity_measures(net, lambda: net(x), y, generator=torch.Generator().manual_seed(0))
    flat_loss, _ = capacity_measures(net, lambda: net(x), y, loss=lambda: torch.zeros(()))
    assert by_error["pacbayes_sigma"] < SIGMA_RANGE[1] == flat_loss["pacbayes_sigma"]


def one_dimensional_net(weights, biases, outgoing):
    net = nn.Sequential(nn.Linear(1, len(weights)), nn.ReLU(), nn.Linear(len(weights), 1)).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor(weights, dtype=torch.float64).unsqueeze(1))
        net[0].bias.copy_(torch.tensor(biases, dtype=torch.float64))
        net[2].weight.copy_(torch.tensor(outgoing, dtype=torch.float64).unsqueeze(0))
        net[2].bias.fill_(0.7)
    return net


def total_slope_jumps(net, low=-8.0, high=8.0, cells=2**14):
    """The integral of |f''| of a 1-D piecewise-linear net, from its values on a fine grid alone: the total
    variation of the slopes of the cells (exact as long as no cell holds two knots with opposite jumps)."""
    x = torch.linspace(low, high, cells + 1, dtype=torch.float64).unsqueeze(1)
    with torch.no_grad():
        slopes = net(x).squeeze(1).diff() / x.squeeze(1).diff()
    return float(slopes.diff().abs().sum())


def test_r_norm_in_one_dimension_is_the_integral_of_the_second_derivative():
    generator = torch.Generator().manual_seed(3)
    knots = torch.rand(6, generator=generator) * 10 - 5
    weights = torch.randn(6, generator=generator) * 2
    outgoing = torch.randn(6, generator=generator).tolist()
    biases = (-weights * knots).tolist()
    weights = weights.tolist()
    # two more units on the first unit's knot: one with the same orientation, one turned around
    weights += [3 * weights[0], -0.5 * weights[0]]
    biases += [3 * biases[0], -0.5 * biases[0]]
    outgoing += [0.4, -1.3]
    net = one_dimensional_net(weights, biases, outgoing)
    scalars, _ = measure(net, torch.randn(4, 1, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    assert scalars["r_norm"] == pytest.approx(total_slope_jumps(net), rel=1e-6)
    assert scalars["f1_path_norm"] > scalars["r_norm"] * 1.05  # the biases and the unmerged units count there


def test_r_norm_ignores_how_the_function_is_written():
    torch.manual_seed(11)
    net = two_layer().double()
    weights, biases, outgoing = net[0].weight.detach(), net[0].bias.detach(), net[2].weight.detach().T
    reference = r_norm(weights, biases, outgoing)
    halves = torch.cat([outgoing[:1] / 2, outgoing[1:], outgoing[:1] / 2])
    split = r_norm(torch.cat([weights, weights[:1]]), torch.cat([biases, biases[:1]]), halves)
    scale = torch.tensor([3.0, 0.25, 1.0, 7.0, 0.5], dtype=torch.float64)
    rescaled = r_norm(weights * scale.unsqueeze(1), biases * scale, outgoing / scale.unsqueeze(1))
    v = torch.ones(1, 4, dtype=torch.float64)  # v relu(z) - v relu(-z) = v z: an affine term costs nothing
    affine = r_norm(
        torch.cat([weights, weights[:1], -weights[:1]]),
        torch.cat([biases, biases[:1], -biases[:1]]),
        torch.cat([outgoing, v, -v]),
    )
    constant = r_norm(torch.cat([weights, 0 * v[:, :3]]), torch.cat([biases, v[0, :1]]), torch.cat([outgoing, v]))
    for value in (split, rescaled, affine, constant):
        assert value == pytest.approx(reference, rel=1e-12)
    distinct_hyperplanes = float((outgoing.double().norm(dim=1) * weights.double().norm(dim=1)).sum())
    assert reference == pytest.approx(distinct_hyperplanes, rel=1e-12)


def test_distance_from_init_matches_parameters_saved_with_a_submodule_compiled_the_other_way():
    torch.manual_seed(1)
    net = two_layer()
    initial = {f"_orig_mod.{name}": p.detach().clone() for name, p in net.named_parameters()}  # torch.compile(net)
    with torch.no_grad():
        net[0].weight.add_(0.3)
    scalars, skipped = measure(net, torch.randn(6, 3), initial_parameters=initial)
    assert scalars["distance_from_init"] == pytest.approx(math.sqrt(15 * 0.09), rel=1e-6), skipped
