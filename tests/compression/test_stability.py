import itertools
import math
import random
import warnings

import pytest
import torch
from torch import nn
from torch.autograd.functional import jacobian
from torch.utils.checkpoint import checkpoint

from lightning_nt.compression.capacity import margin_quantile
from lightning_nt.compression.stability import NoiseStability, layer_jvp, noise_stability


def outputs_of(net, x, names):
    """Each named layer's output in a plain forward, recorded independently of the module under test."""
    modules = dict(net.named_modules())
    found = {}
    handles = [
        modules[name].register_forward_hook(lambda m, a, out, name=name: found.__setitem__(name, out.detach().clone()))
        for name in names
    ]
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return found


def mlp(widths, bias=True, activation=nn.ReLU):
    layers = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out, bias=bias), activation()]
    return nn.Sequential(*layers[:-1])


def test_jvp_of_a_bias_free_relu_mlp_is_homogeneous():
    torch.manual_seed(0)
    net, x = mlp([5, 16, 16, 3], bias=False), torch.randn(8, 5)
    x0 = outputs_of(net, x, ["0"])["0"]
    products = layer_jvp(net, lambda: net(x), "0", x0, ["2", "4"])
    expected = outputs_of(net, x, ["2", "4"])
    for name in ("2", "4"):
        torch.testing.assert_close(products[name], expected[name], atol=1e-5, rtol=1e-5)

    biased = mlp([5, 16, 16, 3])
    x0 = outputs_of(biased, x, ["0"])["0"]
    products = layer_jvp(biased, lambda: biased(x), "0", x0, ["4"])
    assert not torch.allclose(products["4"], outputs_of(biased, x, ["4"])["4"], atol=1e-3)


def test_jvp_matches_the_exact_jacobian_per_example():
    torch.manual_seed(1)
    net, x = mlp([3, 6, 5, 2], activation=nn.Tanh), torch.randn(4, 3)
    x0 = outputs_of(net, x, ["0"])["0"]
    tangent = torch.randn_like(x0)
    product = layer_jvp(net, lambda: net(x), "0", tangent, ["4"])["4"]
    for b in range(len(x)):
        exact = jacobian(lambda z: net[1:](z), x0[b])
        torch.testing.assert_close(product[b], exact @ tangent[b], atol=1e-5, rtol=1e-5)


def test_layer_cushion_of_a_gaussian_layer_is_about_one_over_sqrt_width():
    torch.manual_seed(2)
    h = 256
    layer, x = nn.Linear(h, h), torch.randn(32, h)
    nn.init.normal_(layer.weight)
    report = noise_stability(layer, lambda: layer(x), num_noise_samples=1)
    mu = report.layer_cushion[""]
    w = layer.weight.detach()
    assert mu == pytest.approx(float(((x @ w.T).norm(dim=1) / (w.norm() * x.norm(dim=1))).min()), rel=1e-5)
    assert 1 / (1.5 * math.sqrt(h)) < mu < 1.5 / math.sqrt(h)


def test_layer_cushion_of_a_rank_one_layer_on_its_input_direction_is_one():
    torch.manual_seed(3)
    u, v = torch.randn(6), torch.randn(4)
    layer = nn.Linear(4, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.outer(u, v))
    x = torch.randn(5, 1) * v
    report = noise_stability(layer, lambda: layer(x), num_noise_samples=1)
    assert report.layer_cushion[""] == pytest.approx(1.0, abs=1e-5)
    other = torch.randn(5, 4)
    assert noise_stability(layer, lambda: layer(other), num_noise_samples=1).layer_cushion[""] < 0.99


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
        lambda: nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
        lambda: nn.Conv1d(4, 2, 3, dilation=2, groups=2, padding=2, padding_mode="circular"),
    ],
)
def test_conv_layer_cushion_uses_the_exact_operator_norm(conv):
    torch.manual_seed(4)
    layer = conv()
    x = torch.randn(3, layer.in_channels, *[5] * (layer.weight.ndim - 2))

    def linear_map(z):
        return layer._conv_forward(z.unsqueeze(0), layer.weight, None).squeeze(0)

    with torch.no_grad():
        frobenius = jacobian(linear_map, x[0]).reshape(-1, x[0].numel()).norm()
        expected = min(float(linear_map(example).norm() / (frobenius * example.norm())) for example in x)
    report = noise_stability(layer, lambda: layer(x).flatten(1), num_noise_samples=1)
    assert report.layer_cushion[""] == pytest.approx(expected, rel=1e-5)


def test_activation_contraction_of_a_relu_net():
    torch.manual_seed(5)
    net, x = mlp([4, 12, 12, 3]), torch.randn(10, 4)
    report = noise_stability(net, lambda: net(x), num_noise_samples=1)
    found = outputs_of(net, x, ["0", "2"])
    expected = max(float((out.norm(dim=1) / out.relu().norm(dim=1)).max()) for out in found.values())
    assert report.activation_contraction == pytest.approx(expected, rel=1e-6)
    assert report.activation_contraction >= 1


def exact_interlayer_cushions(net, x, names, maps):
    """``min_{j > i, b} ||J x_i|| / (||J||_F ||x_i||)`` per layer ``i`` from full Jacobians; ``maps[(i, j)]`` is
    the network from layer ``i``'s output to layer ``j``'s."""
    found = outputs_of(net, x, names)
    cushions = {}
    for i in names[:-1]:
        values = []
        for j in names[names.index(i) + 1 :]:
            for xi in found[i]:
                J = jacobian(maps[i, j], xi).reshape(-1, xi.numel())
                values.append(float((J @ xi).norm() / (J.norm() * xi.norm())))
        cushions[i] = min(values)
    return cushions


def tanh_relu_net(width):
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 2))


def sequential_maps(net):
    return {("0", "2"): net[1:3], ("0", "4"): net[1:5], ("2", "4"): net[3:5]}


def test_interlayer_cushion_is_exact_on_small_layers():
    torch.manual_seed(6)
    net, x = tanh_relu_net(5), torch.randn(6, 3)
    report = noise_stability(net, lambda: net(x), num_probes=5, num_noise_samples=1)
    expected = exact_interlayer_cushions(net, x, ["0", "2", "4"], sequential_maps(net))
    assert report.interlayer_cushion.keys() == expected.keys()
    for name, value in expected.items():
        assert report.interlayer_cushion[name] == pytest.approx(value, rel=1e-5)


def test_interlayer_cushion_by_hutchinson_is_within_its_error():
    torch.manual_seed(7)
    net, x = tanh_relu_net(64), torch.randn(6, 3)
    num_probes = 48
    report = noise_stability(
        net, lambda: net(x), num_probes=num_probes, num_noise_samples=1, generator=torch.Generator().manual_seed(0)
    )
    expected = exact_interlayer_cushions(net, x, ["0", "2", "4"], sequential_maps(net))
    # ||J||_F^2 from k Gaussian probes has relative standard error <= sqrt(2 / k); allow 3 of them on ||J||_F
    tolerance = 3 * math.sqrt(2 / num_probes) / 2
    for name, value in expected.items():
        assert report.interlayer_cushion[name] == pytest.approx(value, rel=tolerance)


def test_hutchinson_estimate_is_unbiased():
    torch.manual_seed(8)
    net, x = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64)), torch.randn(1, 3)
    num_probes, repeats = 16, 40
    expected = exact_interlayer_cushions(net, x, ["0", "2"], {("0", "2"): net[1:]})["0"]
    # one example and one layer pair: 1 / mu^2 is proportional to the estimate of ||J||_F^2
    estimates = [
        noise_stability(
            net, lambda: net(x), num_probes=num_probes, num_noise_samples=1, generator=torch.Generator().manual_seed(s)
        ).interlayer_cushion["0"]
        ** -2
        for s in range(repeats)
    ]
    assert sum(estimates) / repeats == pytest.approx(expected**-2, rel=3 * math.sqrt(2 / (num_probes * repeats)))


def test_interlayer_smoothness_in_one_dimension():
    torch.manual_seed(9)
    net, x = nn.Sequential(nn.Linear(2, 1), nn.Tanh(), nn.Linear(1, 1)), torch.randn(4, 2)
    delta = 0.3
    report = noise_stability(net, lambda: net(x), noise_scale=delta, num_noise_samples=12)
    with torch.no_grad():
        x0 = net[0](x).squeeze(1)
        w, b = net[2].weight.item(), net[2].bias.item()
        x1 = w * x0.tanh() + b
        ratios = []
        for sign in (1, -1):  # in one dimension eta is +-delta |x_0|: twelve draws see both signs
            moved = x0 + sign * delta * x0.abs()
            residual = w * moved.tanh() + b - w * (1 - x0.tanh() ** 2) * moved
            ratios.append(delta * x1.abs() / residual.abs())
    assert report.interlayer_smoothness == pytest.approx(float(torch.cat(ratios).min()), rel=1e-4)


def test_smoothness_and_attenuation_of_a_linear_net():
    torch.manual_seed(8)
    net, x = nn.Sequential(nn.Linear(4, 8, bias=False), nn.Linear(8, 3, bias=False)), torch.randn(5, 4)
    report = noise_stability(net, lambda: net(x), noise_scale=0.2)
    assert report.interlayer_smoothness > 1e5  # M = J exactly: only rounding error is left
    assert report.noise_attenuation["1"] == pytest.approx(0.2, rel=1e-5)  # noise added to the logits themselves
    relu = mlp([4, 8, 3])
    assert 0 < noise_stability(relu, lambda: relu(x)).interlayer_smoothness < 1e5


def test_effective_params_follows_theorem_4_1():
    torch.manual_seed(9)
    net, x = mlp([4, 10, 10, 3]), torch.randn(12, 4)
    with torch.no_grad():
        logits = net(x)
    labels = logits.argmax(dim=1)
    report = noise_stability(net, lambda: net(x), labels, num_noise_samples=1)
    gamma = margin_quantile(logits, labels)
    total = (
        sum(
            1 / (report.layer_cushion[name] ** 2 * report.interlayer_cushion.get(name, 1.0) ** 2) for name in ("0", "2")
        )
        + 1 / report.layer_cushion["4"] ** 2
    )
    expected = report.activation_contraction**2 * 9 * float(logits.norm(dim=1).max()) ** 2 * total / gamma**2
    assert report.effective_params == pytest.approx(expected, rel=1e-5)
    assert noise_stability(net, lambda: net(x), gamma=2 * gamma, num_noise_samples=1).effective_params == (
        pytest.approx(expected / 4, rel=1e-5)
    )


def test_effective_params_without_a_positive_margin_is_skipped():
    torch.manual_seed(10)
    net, x = mlp([4, 6, 3]), torch.randn(8, 4)
    wrong = net(x).argmin(dim=1)  # every example misclassified: every margin negative
    for report, why in (
        (noise_stability(net, lambda: net(x), num_noise_samples=1), "pass `gamma` or `labels`"),
        (noise_stability(net, lambda: net(x), gamma=-1.0, num_noise_samples=1), "`gamma` was given as -1.0"),
        (noise_stability(net, lambda: net(x), wrong, num_noise_samples=1), "a tenth of the examples are misclassified"),
    ):
        assert math.isnan(report.effective_params)
        assert "effective_params" not in report.scalars()
        assert any(reason.startswith("effective_params") and why in reason for reason in report.skipped)


def test_scalars_tags():
    torch.manual_seed(11)
    net, x = mlp([4, 6, 3]), torch.randn(8, 4)
    scalars = noise_stability(net, lambda: net(x), gamma=1.0, num_noise_samples=1).scalars()
    assert set(scalars) == {
        "layer_cushion/0",
        "layer_cushion/2",
        "min_layer_cushion",
        "interlayer_cushion/0",
        "min_interlayer_cushion",
        "noise_attenuation/0",
        "noise_attenuation/2",
        "activation_contraction",
        "interlayer_smoothness",
        "effective_params",
    }
    assert scalars["min_layer_cushion"] == min(scalars["layer_cushion/0"], scalars["layer_cushion/2"])


def test_state_is_left_exactly_as_found():
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    net[4].eval()
    x = torch.randn(16, 4)
    net(x).square().sum().backward()
    state = {name: value.clone() for name, value in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    modes = [m.training for m in net.modules()]
    rng, python_rng = torch.get_rng_state(), random.getstate()
    noise_stability(net, lambda: net(x), gamma=1.0)
    assert all(torch.equal(value, state[name]) for name, value in net.state_dict().items())
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == python_rng


def test_generator_makes_the_report_reproducible():
    torch.manual_seed(13)
    net, x = tanh_relu_net(32), torch.randn(8, 3)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return noise_stability(net, lambda: net(x), gamma=1.0, num_probes=8, generator=generator)

    assert run(0) == run(0)
    assert run(0).interlayer_cushion != run(1).interlayer_cushion


class SharedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc(self.fc(x).relu()).relu())


def test_a_layer_run_twice_is_skipped():
    torch.manual_seed(14)
    net, x = SharedLayer(), torch.randn(5, 4)
    report = noise_stability(net, lambda: net(x), gamma=1.0, num_noise_samples=1)
    assert report.layers == ["out"]
    assert "fc: ran 2 times in one forward" in report.skipped
    assert math.isnan(report.effective_params)  # a sum over some of the layers would understate Theorem 4.1's
    assert "effective_params: sums over every layer, and ['fc'] could not be measured" in report.skipped


class OddlyNamedSharedLayer(nn.Module):
    """A layer run twice, held in a ``ModuleDict`` under a key with ``": "`` and a quote in it (PyTorch allows any
    name without a dot)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"fc: 'shared'": nn.Linear(4, 4), "out": nn.Linear(4, 2)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.blocks["fc: 'shared'"]
        return self.blocks["out"](shared(shared(x).relu()).relu())


def test_a_left_out_layer_is_named_exactly_whatever_its_name():
    """The left-out layers come from the recording step, not from parsing the reasons (found: the text before the
    first ``":"`` was taken for the name, here ``blocks.fc``)."""
    torch.manual_seed(14)
    net, x = OddlyNamedSharedLayer(), torch.randn(5, 4)
    report = noise_stability(net, lambda: net(x), gamma=1.0, num_noise_samples=1)
    assert report.layers == ["blocks.out"]
    assert report.skipped[0] == "blocks.fc: 'shared': ran 2 times in one forward"
    names = repr(["blocks.fc: 'shared'"])
    assert f"effective_params: sums over every layer, and {names} could not be measured" in report.skipped


class FoldedTokens(nn.Module):
    """An MLP over the positions of ``[B, T, d]`` folded into the batch dimension (``[B * T, d]``), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(4, 6), nn.Linear(6 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x.reshape(-1, 4))).reshape(len(x), -1))


def test_layers_on_folded_positions_are_named_and_effective_params_is_not_reported():
    torch.manual_seed(15)
    net, x = FoldedTokens(), torch.randn(8, 3, 4)
    report = noise_stability(net, lambda: net(x), gamma=1.0, num_noise_samples=1)
    assert report.layers == ["head"]
    assert any(reason.startswith("embed: its output [24, 6] doesn't hold the 8 examples") for reason in report.skipped)
    assert math.isnan(report.effective_params) and "effective_params" not in report.scalars()


def test_a_model_without_layers_gives_an_empty_report():
    net, x = nn.Sequential(nn.Flatten(), nn.ReLU()), torch.randn(5, 3)
    report = noise_stability(net, lambda: net(x), torch.zeros(5, dtype=torch.long))
    assert report.layers == [] and report.scalars() == {}
    assert report == NoiseStability(skipped=report.skipped) and len(report.skipped) == 1


class DoubleWithoutForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def test_an_operation_without_forward_mode_ad_is_reported_not_raised():
    torch.manual_seed(15)
    net, x = mlp([3, 5, 2]), torch.randn(4, 3)
    report = noise_stability(net, lambda: net[2](DoubleWithoutForwardAD.apply(net[1](net[0](x)))), gamma=1.0)
    assert report.layers == ["0", "2"] and set(report.layer_cushion) == {"0", "2"}
    assert any(reason.startswith("0: noise response failed") for reason in report.skipped)
    assert report.noise_attenuation["2"] == pytest.approx(0.1, rel=1e-5)
    assert math.isnan(report.effective_params) and "effective_params: needs every layer's interlayer cushion" in (
        report.skipped
    )


def test_a_derivative_lost_in_a_reentrant_checkpoint_is_reported_not_taken_for_independence():
    # torch.utils.checkpoint(use_reentrant=True) passes no tangent: layer 2 looked independent of layer 0, so
    # effective_params used an interlayer cushion of 1 for it, and an empty smoothness list crashed the report
    torch.manual_seed(17)
    net, x = mlp([3, 5, 2]), torch.randn(4, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "None of the inputs have requires_grad=True"
        report = noise_stability(
            net, lambda: net[2](checkpoint(lambda v: net[1](net[0](v)), x, use_reentrant=True)), gamma=1.0
        )
    assert any(reason.startswith("0: noise response failed") and "use_reentrant" in reason for reason in report.skipped)
    assert math.isnan(report.effective_params) and math.isnan(report.interlayer_smoothness)


def test_a_forward_under_autocast():
    torch.manual_seed(16)
    net, x = mlp([4, 16, 16, 3]), torch.randn(8, 4)

    def predict():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net(x)

    half = noise_stability(net, predict, gamma=1.0, num_noise_samples=1)
    full = noise_stability(net, lambda: net(x), gamma=1.0, num_noise_samples=1)
    assert half.skipped == [] and half.layers == full.layers
    for name, value in full.layer_cushion.items():
        assert half.layer_cushion[name] == pytest.approx(value, rel=0.05)
    for name, value in full.interlayer_cushion.items():
        assert half.interlayer_cushion[name] == pytest.approx(value, rel=0.05)


def test_bad_arguments():
    net = mlp([3, 2])
    with pytest.raises(ValueError, match="noise_scale"):
        noise_stability(net, lambda: net(torch.randn(2, 3)), noise_scale=0.0)


def test_an_example_with_every_relu_unit_off_is_not_taken_for_a_lost_derivative():
    """Its derivative is zero (a fact), while finite noise can switch a unit on and move the later layer: refused as
    "an operation passes no tangent" before, for 2 initialisations in 40 of the docstring's 4-8-3 net (here, 7)."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    report = noise_stability(net, lambda: net(x), y, gamma=1.0)
    assert [reason for reason in report.skipped if not reason.startswith("activation_contraction")] == []
    assert report.layers == ["0", "2"] and all(map(math.isfinite, report.interlayer_cushion.values()))


def test_an_example_with_every_relu_unit_off_makes_the_contraction_infinite_and_says_so():
    """``||x_0|| <= c ||relu(x_0)||`` holds for no finite ``c`` on that example (before: ``nan`` effective_params,
    nothing in ``skipped``); its zero input holds the next layer's cushion inequality for every ``mu``, so the
    cushion is the minimum over the other examples."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    hidden = net[1](outputs_of(net, x, ["0"])["0"])
    dead = hidden.norm(dim=1) == 0
    assert int(dead.sum()) == 1  # the case under test
    report = noise_stability(net, lambda: net(x), y, gamma=1.0)
    assert report.activation_contraction == math.inf and report.effective_params == math.inf
    assert any("activation_contraction is infinite: 1 example(s)" in reason for reason in report.skipped)
    w = net[2].weight.detach()
    alive = hidden[~dead]
    expected = float(((alive @ w.T).norm(dim=1) / (w.norm() * alive.norm(dim=1))).min())
    assert report.layer_cushion["2"] == pytest.approx(expected, rel=1e-5)


def test_a_layer_with_zero_weights_has_no_cushion_and_no_effective_params():
    torch.manual_seed(0)
    net, x = mlp([4, 6, 3]), torch.randn(8, 4)
    nn.init.zeros_(net[2].weight)
    report = noise_stability(net, lambda: net(x), torch.zeros(8, dtype=torch.long), gamma=1.0)
    assert "2" not in report.layer_cushion and "0" in report.layer_cushion
    assert "layer_cushion/2: its weight is zero or so is every example's input" in report.skipped
    assert math.isnan(report.effective_params)
    assert "effective_params: sums over every layer, and ['2'] could not be measured" in report.skipped
