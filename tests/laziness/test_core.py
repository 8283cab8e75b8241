"""The laziness core against independent references: autograd Jacobians, the arc-cosine NTK, brute force."""

import collections
import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_nt.common.validation import ArgumentError
from lightning_nt.laziness import (
    TwoLayerReLU,
    activation_layers,
    activation_patterns,
    empirical_ntk,
    jacobian_bytes,
    kernel_alignment,
    pattern_flips,
    relative_distance,
    two_layer_relu_ntk,
    zero_centred_kernels,
)
from lightning_nt.laziness.callback import _default_labels


def _mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).to(dtype)


def _reference_ntk(net, inputs):
    """Independent: the full Jacobian of all outputs by torch.autograd.functional.jacobian, traced over outputs."""
    names = [name for name, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def outputs(vector):
        weights = {n: v.reshape(s) for n, v, s in zip(names, vector.split(sizes), shapes)}
        return torch.func.functional_call(net, weights, (inputs,))

    jacobian = torch.autograd.functional.jacobian(outputs, flat)  # [m, C, P]
    return torch.einsum("icp,jcp->ij", jacobian, jacobian)


@pytest.mark.parametrize("hold_jacobians", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_empirical_ntk_equals_the_autograd_jacobian_reference(chunk_size, hold_jacobians):
    net = _mlp()
    inputs = torch.randn(9, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kernel = empirical_ntk(net, inputs, chunk_size=chunk_size, hold_jacobians=hold_jacobians)
    reference = _reference_ntk(net, inputs)
    assert kernel.shape == (9, 9) and kernel.dtype == torch.float64
    torch.testing.assert_close(kernel, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))


def test_empirical_ntk_in_float32_matches_the_float64_reference():
    net = _mlp(torch.float32)
    inputs = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    reference = _reference_ntk(net.double(), inputs.double())
    kernel = empirical_ntk(net.float(), inputs)
    assert kernel.dtype == torch.float32
    torch.testing.assert_close(kernel.double(), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


@dataclass
class Batch:
    features: torch.Tensor
    labels: torch.Tensor
    scale: torch.Tensor


def test_any_batch_structure_and_forward_fn_give_the_same_kernel():
    net = _mlp()
    inputs = torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    labels = torch.arange(5)
    reference = _reference_ntk(net, 2 * inputs)
    as_dict = empirical_ntk(net, {"x": inputs, "y": labels}, forward_fn=lambda m, b: m(2 * b["x"]), chunk_size=2)
    as_dataclass = empirical_ntk(
        net, Batch(inputs, labels, torch.tensor(2.0)), forward_fn=lambda m, b: m(b.scale * b.features)
    )
    torch.testing.assert_close(as_dict, reference)
    torch.testing.assert_close(as_dataclass, reference)


def test_a_module_with_full_backward_hooks_gives_its_functions_kernel_and_keeps_its_hooks():
    # torch.func's jacrev refused the hook's autograd Function (no setup_context): a user's gradient monitor, or
    # Opacus's per-sample hooks beside LazinessMonitor, ended the fit
    net = _mlp()
    inputs = torch.randn(4, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    calls = []
    net[0].register_full_backward_hook(lambda module, grad_input, grad_output: calls.append(1))
    net.register_full_backward_pre_hook(lambda module, grad_output: None)
    reference = _reference_ntk(net, inputs)  # autograd runs the hooks
    calls.clear()
    torch.testing.assert_close(empirical_ntk(net, inputs), reference)
    assert not calls
    net(inputs).sum().backward()
    assert calls == [1]  # the hooks are back after the measurement


def test_frozen_parameters_are_left_out():
    net = _mlp()
    inputs = torch.randn(4, 5, dtype=torch.float64)
    for parameter in net[0].parameters():
        parameter.requires_grad_(False)
    torch.testing.assert_close(empirical_ntk(net, inputs), _reference_ntk(net[1:], net[0](inputs).detach()))
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        empirical_ntk(net, inputs)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("chunk_size", v) for v in (0, -1, 2.5, "4", True)] + [("hold_jacobians", v) for v in ("no", 1, None)],
)
def test_empirical_ntk_refuses_bad_arguments_naming_them(argument, value):
    with pytest.raises(ArgumentError, match=f"`{argument}`"):
        empirical_ntk(nn.Linear(2, 1), torch.zeros(3, 2), **{argument: value})


def _relative_error(width, seed, inputs, outputs=2):
    net = TwoLayerReLU(inputs.shape[1], width, outputs, generator=torch.Generator().manual_seed(seed)).double()
    limit = outputs * two_layer_relu_ntk(inputs, inputs)
    return float((empirical_ntk(net, inputs) - limit).norm() / limit.norm())


def test_wide_two_layer_relu_ntk_matches_the_arc_cosine_kernel_within_a_tolerance_shrinking_with_width():
    """Fluctuations of the empirical NTK at init are O(width^-1/2) (Jacot et al.); measured 0.12 and 0.016."""
    inputs = torch.randn(12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {width: np.mean([_relative_error(width, seed, inputs) for seed in range(3)]) for width in (256, 16384)}
    for width, error in errors.items():
        assert error < 3 / math.sqrt(width), (width, error)
    assert errors[256] > 4 * errors[16384]  # sqrt(64) = 8 expected


def test_the_closed_form_is_the_monte_carlo_expectation_it_states():
    """Independent of the NTK code: the two expectations of the formula, estimated by sampling the weights."""
    generator = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    w = torch.randn(400_000, 3, generator=generator, dtype=torch.float64)
    u, v = w @ x / math.sqrt(3), w @ y / math.sqrt(3)
    sampled = (F.relu(u) * F.relu(v)).mean() + ((u > 0) & (v > 0)).double().mean() * (x @ y) / 3
    assert float(two_layer_relu_ntk(x[None], y[None])) == pytest.approx(float(sampled), rel=1e-2)


def _numpy_alignment(kernel, onehot):
    m = kernel.shape[0]
    h = np.eye(m) - np.ones((m, m)) / m
    kc, lc = h @ kernel @ h, h @ (onehot @ onehot.T) @ h
    return float((kc * lc).sum() / (np.linalg.norm(kc) * np.linalg.norm(lc)))


def test_kernel_alignment_matches_an_independent_numpy_computation():
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(3, (20,), generator=generator)
    kernel = features @ features.T
    expected = _numpy_alignment(kernel.numpy(), np.eye(3)[labels.numpy()])
    assert kernel_alignment(kernel, labels) == pytest.approx(expected, rel=1e-12)
    assert kernel_alignment(7 * kernel.float(), labels) == pytest.approx(expected, rel=1e-5)
    onehot = F.one_hot(labels, 3).double()
    assert kernel_alignment(onehot @ onehot.T, onehot) == pytest.approx(1.0)
    assert kernel_alignment(-(onehot @ onehot.T), labels) == pytest.approx(-1.0)
    assert math.isnan(kernel_alignment(torch.ones(4, 4), torch.tensor([0, 1, 0, 1])))
    with pytest.raises(ValueError, match="rows"):
        kernel_alignment(kernel, labels[:5])


def test_activation_patterns_are_the_signs_of_the_pre_activations():
    net = _mlp(torch.float32)
    inputs = torch.randn(8, 5, generator=torch.Generator().manual_seed(6))
    patterns = activation_patterns(net, inputs)
    assert list(patterns) == ["3"] == activation_layers(net)
    expected = net[2](torch.tanh(net[0](inputs))) > 0
    assert torch.equal(patterns["3"], expected)
    named = activation_patterns(net, inputs, layers=["0", "3"])
    assert torch.equal(named["0"], net[0](inputs) > 0)  # a Linear: the sign of its output


def test_an_activation_called_with_its_input_by_keyword_is_recorded_as_by_position():
    """Found by review: ``self.act(input=h)`` reached the pre-hook with no positional argument: IndexError."""

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear, self.act = nn.Linear(5, 4), nn.ReLU()

        def forward(self, inputs: torch.Tensor, by_keyword: bool = True) -> torch.Tensor:
            hidden = self.linear(inputs)
            return self.act(input=hidden) if by_keyword else self.act(hidden)

    net, inputs = Keyword(), torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    keyword = activation_patterns(net, inputs)
    positional = activation_patterns(net, inputs, forward_fn=lambda module, batch: module(batch, by_keyword=False))
    assert keyword.keys() == {"act"} and torch.equal(keyword["act"], positional["act"])
    assert torch.equal(keyword["act"], net.linear(inputs) > 0)


def test_activation_patterns_of_a_convolution_flatten_channels_and_positions():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    inputs = torch.randn(3, 1, 4, 4)
    patterns = activation_patterns(net, {"images": inputs}, forward_fn=lambda module, batch: module(batch["images"]))
    assert patterns["1"].shape == (3, 32)
    assert torch.equal(patterns["1"], (net[0](inputs) > 0).flatten(1))


class SharedReLU(nn.Module):
    """One ReLU module applied twice, as in torchvision's ResNet blocks."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.relu = nn.Linear(3, 4), nn.Linear(4, 2), nn.ReLU()

    def forward(self, x):
        return self.relu(self.second(self.relu(self.first(x))))


def test_a_shared_activation_module_contributes_every_call():
    net = SharedReLU()
    inputs = torch.randn(5, 3)
    patterns = activation_patterns(net, inputs)
    hidden = net.first(inputs)
    expected = torch.cat([hidden > 0, net.second(torch.relu(hidden)) > 0], dim=1)
    assert torch.equal(patterns["relu"], expected)


def test_activation_patterns_name_missing_or_unused_layers():
    net = _mlp(torch.float32)
    with pytest.raises(ValueError, match="nope"):
        activation_patterns(net, torch.zeros(2, 5), layers=["nope"])
    with pytest.raises(RuntimeError, match="not called"):
        activation_patterns(net, torch.zeros(2, 5), layers=["3"], forward_fn=lambda module, batch: module[0](batch))


def test_pattern_flips_count_every_changed_sign():
    generator = torch.Generator().manual_seed(7)
    before = {"a": torch.rand(10, 4, generator=generator) > 0.5, "b": torch.rand(10, 6, generator=generator) > 0.5}
    after = {name: pattern ^ (torch.rand(pattern.shape, generator=generator) > 0.7) for name, pattern in before.items()}
    flips = pattern_flips(before, after)
    brute = {name: sum(bool(x != y) for x, y in zip(before[name].flatten(), after[name].flatten())) for name in before}
    assert flips["a"] == brute["a"] / 40 and flips["b"] == brute["b"] / 60
    assert flips[""] == pytest.approx((brute["a"] + brute["b"]) / 100)
    assert pattern_flips(before, before) == {"a": 0.0, "b": 0.0, "": 0.0}
    with pytest.raises(ValueError, match="different layers"):
        pattern_flips(before, {"a": after["a"]})


def test_relative_distance_matches_numpy_per_tensor_and_per_layer():
    net = _mlp(torch.float32)
    initial = {name: p.detach().clone() for name, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    current = dict(net.named_parameters())
    distance = relative_distance(current, initial)
    for name, value in distance.parts.items():
        a, b = current[name].detach().double().numpy(), initial[name].double().numpy()
        assert value == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-12)
    everything = [np.concatenate([t.detach().double().numpy().ravel() for t in d.values()]) for d in (current, initial)]
    overall = np.linalg.norm(everything[0] - everything[1]) / np.linalg.norm(everything[1])
    assert distance.overall == pytest.approx(overall, rel=1e-12)
    layers = relative_distance(current, initial, by_layer=True).parts
    assert sorted(layers) == ["0", "2", "4"]
    now, start = (
        np.concatenate([d[f"2.{k}"].detach().double().numpy().ravel() for k in ("weight", "bias")])
        for d in (current, initial)
    )
    assert layers["2"] == pytest.approx(np.linalg.norm(now - start) / np.linalg.norm(start), rel=1e-12)


def test_relative_distance_leaves_zero_initialised_parts_out():
    distance = relative_distance(
        {"w": torch.tensor([1.0]), "b": torch.tensor([2.0])}, {"w": torch.ones(1), "b": torch.zeros(1)}
    )
    assert distance.parts == {"w": 0.0} and distance.overall == pytest.approx(2.0)
    with pytest.raises(ValueError, match="different tensors"):
        relative_distance({"w": torch.ones(1)}, {"v": torch.ones(1)})


def test_zero_centred_kernels_names_the_one_of_the_alignment_that_is_zero():
    kernel, labels = torch.tensor([[2.0, 1.0], [1.0, 3.0]]), torch.tensor([0, 1])
    assert zero_centred_kernels(kernel, labels) == []
    assert zero_centred_kernels(kernel, torch.tensor([1, 1])) == ["label kernel"]
    assert zero_centred_kernels(torch.full((2, 2), 4.0), labels) == ["NTK"]
    assert zero_centred_kernels(torch.ones(2, 2), torch.tensor([0, 0])) == ["label kernel", "NTK"]
    assert math.isnan(kernel_alignment(torch.ones(2, 2), labels))


def test_the_default_labels_are_where_a_batch_conventionally_holds_them():
    x, y, index = torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.arange(4)
    Pair = collections.namedtuple("Pair", ["index", "label", "x"])
    Labelled = dataclasses.make_dataclass("Labelled", ["x", "targets", "index"])
    cases = [
        ((x, y, index), "second item"),
        ([x, y], "second item"),
        ({"index": index, "x": x, "label": y}, "'label'"),
        ({"inputs": x, "y": y, "id": index}, "'y'"),
        (Pair(index, y, x), "field 'label'"),
        (Labelled(x, y, index), "field 'targets'"),
    ]
    for batch, place in cases:
        labels, where = _default_labels(batch)
        assert labels is y and where == place, batch
    # no conventional labels: the last one-dimensional integer tensor, as before
    assert _default_labels((x, torch.randn(4), y))[0] is y
    assert _default_labels({"x": x, "token_ids": index, "cls": y}) == (y, "last one-dimensional integer tensor")
    assert _default_labels((x,)) == (None, "")


@pytest.mark.parametrize(("dtype", "element"), [(torch.float32, 4), (torch.float64, 8)])
def test_jacobian_bytes_is_the_size_of_the_jacobians_empirical_ntk_holds(dtype, element):
    """Against the autograd reference's Jacobian ``[m, C, P]`` (all examples', with hold_jacobians)."""
    net, inputs = _mlp(dtype), torch.randn(9, 5, dtype=dtype)
    net[4].weight.requires_grad_(False)  # frozen parameters are not differentiated
    trainable = [p for p in net.parameters() if p.requires_grad]
    jacobian = torch.autograd.functional.jacobian(
        lambda *ps: _with_params(net, trainable, ps, inputs), tuple(trainable)
    )
    held = sum(j.numel() for j in jacobian) * element
    assert jacobian_bytes(net, inputs) == held
    assert jacobian_bytes(net, inputs, chunk_size=2, hold_jacobians=False) == held * 4 // 9
    assert jacobian_bytes(net, inputs, chunk_size=20, hold_jacobians=False) == held * 2


def _with_params(net, trainable, values, inputs):
    names = {id(p): name for name, p in net.named_parameters()}
    return torch.func.functional_call(net, {names[id(p)]: v for p, v in zip(trainable, values)}, (inputs,))


@pytest.mark.parametrize("hold_jacobians", [True, False])
@pytest.mark.parametrize("output_chunk_size", [1, 2, 3, 7])
def test_the_kernel_summed_over_chunks_of_outputs_equals_the_autograd_jacobian_reference(
    output_chunk_size, hold_jacobians
):
    """Exact: the trace over outputs is a sum, so chunks of 1, 2 (uneven: 3 outputs) or all of them give one kernel."""
    net = _mlp()
    inputs = torch.randn(9, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kernel = empirical_ntk(
        net, inputs, chunk_size=4, hold_jacobians=hold_jacobians, output_chunk_size=output_chunk_size
    )
    reference = _reference_ntk(net, inputs)
    torch.testing.assert_close(kernel, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))
    whole = jacobian_bytes(net, inputs, chunk_size=4, hold_jacobians=hold_jacobians)
    held = jacobian_bytes(net, inputs, chunk_size=4, hold_jacobians=hold_jacobians, output_chunk_size=output_chunk_size)
    assert held == whole * min(output_chunk_size, 3) // 3


def test_an_output_chunk_size_below_one_is_refused_by_name():
    with pytest.raises(ArgumentError, match="`output_chunk_size`"):
        empirical_ntk(_mlp(), torch.randn(2, 5, dtype=torch.float64), output_chunk_size=0)


class FewParametersManyOutputs(nn.Module):
    """6 parameters, 50 outputs (a fixed random read-out, a buffer): forward mode is the cheaper."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(1, 3).double()
        self.register_buffer("readout", torch.randn(50, 3, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(self.hidden(x)) @ self.readout.T


def _spy(transform, name, used):
    def spied(function):
        used.append(name)
        return transform(function)

    return spied


@pytest.mark.parametrize("output_chunk_size", [None, 20, 4])
def test_forward_mode_serves_fewer_parameters_than_outputs_and_equals_the_autograd_jacobian_reference(
    output_chunk_size, monkeypatch
):
    """``jacfwd`` (one pass per parameter) when the parameters (6) are fewer than the outputs of a chunk, ``jacrev``
    (one pass per output) otherwise; both equal to the reference."""
    import lightning_nt.laziness.ntk as ntk

    used = []
    for name in ("jacfwd", "jacrev"):
        monkeypatch.setattr(ntk, name, _spy(getattr(ntk, name), name, used))
    torch.manual_seed(0)
    net, inputs = FewParametersManyOutputs(), torch.randn(7, 1, dtype=torch.float64)
    kernel = empirical_ntk(net, inputs, chunk_size=3, output_chunk_size=output_chunk_size)
    reference = _reference_ntk(net, inputs)
    torch.testing.assert_close(kernel, reference, rtol=1e-6, atol=1e-6 * float(reference.abs().max()))
    assert set(used) == ({"jacrev"} if output_chunk_size == 4 else {"jacfwd"})


class _StraightThrough(torch.autograd.Function):
    """Rounding with the identity as its gradient (a quantised net's STE): a backward, no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.round()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Quantised(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return (_StraightThrough.apply(self.fc(x) * 4) / 4).repeat(1, 8)  # 32 outputs from 16 parameters


def test_forward_mode_falls_back_to_reverse_mode_where_an_operation_has_no_forward_rule():
    """More outputs than parameters picks forward mode, which an STE (or an LSTM's kernel) lacks: the fit crashed
    (found by review); now reverse mode gives the same kernel as the reverse-only chunking, with a warning."""
    torch.manual_seed(0)
    net, inputs = _Quantised(), torch.randn(6, 3)
    assert sum(p.numel() for p in net.parameters()) < 32  # forward mode is the one chosen
    with pytest.warns(UserWarning, match="forward mode failed .* reverse mode instead"):
        kernel = empirical_ntk(net, inputs)
    reverse = empirical_ntk(net, inputs, output_chunk_size=200)  # parameters >= outputs of a chunk: reverse mode
    torch.testing.assert_close(kernel, reverse)
