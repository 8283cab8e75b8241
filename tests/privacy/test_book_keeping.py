"""The single-backward clipping engine against a vmap(grad) clip-and-sum reference, layer kind by layer kind."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_nt.common.validation import ArgumentError
from lightning_nt.demos import StandardizedConv2d, wide_resnet
from lightning_nt.privacy.book_keeping import (
    BookKeepingClipper,
    conv_per_example_grads,
    outer_product_norms,
    supported_layer_names,
)
from lightning_nt.privacy.book_keeping.conv import _adjoint_convolution, _matched
from lightning_nt.privacy.engines import resolved_mode
from tests.contract.test_zoo_structures import assert_the_update_is_the_clipped_sum
from tests.helpers import zoo
from tests.helpers.third_party import Conv1D, LayerNorm2d


class Tokens(nn.Module):
    """Embedding + LayerNorm + Linear over a sequence (positions are what the ghost norm sums over)."""

    def __init__(self, vocab: int = 11, dim: int = 6, classes: int = 3, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens):
        hidden = self.mix(self.norm(self.embed(tokens))).tanh()
        return self.out(hidden.mean(1))


class Cast(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


class Twice(nn.Module):
    """One layer applied twice (a recurrent-style reuse): its calls are more positions of one per-example gradient."""

    def __init__(self, layer, head):
        super().__init__()
        self.layer, self.head = layer, head

    def forward(self, x):
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


class Upsample(nn.Module):
    """A transposed convolution called with ``output_size`` (its output padding chosen per call), then a head."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 12 * 11, 2))

    def forward(self, x):
        return self.head(self.up(x, output_size=[12, 11]).tanh())


class ChangedInPlace(nn.Module):
    """A bias-less standardised convolution on the ghost path (few positions, wide channels) whose output is changed in
    place before the backward pass: ``out += shortcut`` (PreActResNet and many WRN ports) or an in-place LeakyReLU.
    A stem layer first, so that the convolution's output is part of the graph as inside a network."""

    def __init__(self, change: str) -> None:
        super().__init__()
        self.change = change
        self.stem = nn.Conv2d(30, 30, 1)
        self.conv = StandardizedConv2d(30, 30, 1, bias=False)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(30 * 4, 2))

    def forward(self, x):
        shortcut = self.stem(x)
        out = self.conv(torch.relu(shortcut))
        if self.change == "shortcut":
            out += shortcut
        else:
            F.leaky_relu(out, 0.1, inplace=True)
        return self.head(out)


def _head(*layers):
    """``layers``, a tanh, and a linear head to two classes."""
    return nn.Sequential(*layers, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2))


def _conv_net(conv, spatial, **options):
    return nn.Sequential(
        conv(3, 4, 3, **options), nn.GroupNorm(2, 4), nn.ReLU(inplace=True), nn.Flatten(), nn.LazyLinear(2)
    )


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (5,), 3),
    "linear-sequence": (
        lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 3)),
        (6, 5),
        3,
    ),
    "conv1d": (lambda: _conv_net(nn.Conv1d, 1, stride=2, padding=1, dilation=2), (3, 11), 2),
    "conv2d": (lambda: _conv_net(nn.Conv2d, 2, stride=(2, 1), padding=(1, 2), dilation=(1, 2)), (3, 7, 6), 2),
    "conv2d-groups": (
        lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 2)),
        (4, 5, 5),
        2,
    ),
    "conv2d-ghost": (  # 1x1 convolution with few positions and wide channels: ghost norms are cheaper
        lambda: nn.Sequential(nn.Conv2d(40, 40, 1), nn.ReLU(), nn.Flatten(), nn.Linear(40 * 4, 2)),
        (40, 2, 2),
        2,
    ),
    "standardized-conv": (
        lambda: nn.Sequential(StandardizedConv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 2)),
        (3, 5, 5),
        2,
    ),
    "standardized-conv-ghost": (
        lambda: nn.Sequential(StandardizedConv2d(30, 30, 1, bias=True), nn.ReLU(), nn.Flatten(), nn.Linear(30 * 4, 2)),
        (30, 2, 2),
        2,
    ),
    "standardized-conv-ghost-shortcut-added-in-place": (lambda: ChangedInPlace("shortcut"), (30, 2, 2), 2),
    "standardized-conv-ghost-leaky-relu-in-place": (lambda: ChangedInPlace("leaky_relu"), (30, 2, 2), 2),
    "conv2d-kernel-larger-than-activations": (  # instantiated norms, clipped sum by a weight-gradient call
        lambda: nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 2)),
        (8, 3, 3),
        2,
    ),
    "conv2d-twice": (
        lambda: Twice(nn.Conv2d(3, 3, 3, padding=1), nn.Sequential(nn.Flatten(), nn.Linear(3 * 25, 2))),
        (3, 5, 5),
        2,
    ),
    "standardized-conv-ghost-twice": (
        lambda: Twice(StandardizedConv2d(30, 30, 1), nn.Sequential(nn.Flatten(), nn.Linear(30 * 4, 2))),
        (30, 2, 2),
        2,
    ),
    "linear-twice": (lambda: Twice(nn.Linear(5, 5), nn.Linear(5, 3)), (5,), 3),
    "linear-sequence-twice": (
        lambda: Twice(nn.Linear(5, 5), nn.Sequential(nn.Flatten(), nn.Linear(5 * 6, 3))),
        (6, 5),
        3,
    ),
    "opacus-rule-instancenorm": (  # no rule of ours: Opacus's per-sample rule inside the same backward
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.Flatten(), nn.Linear(4 * 9, 2)),
        (3, 5, 5),
        2,
    ),
    "layernorm-groupnorm": (
        lambda: nn.Sequential(
            nn.Linear(5, 8), nn.LayerNorm(8), nn.Unflatten(1, (4, 2)), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(8, 2)
        ),
        (5,),
        2,
    ),
    # transposed convolutions: per-example kernels reused, by a weight-gradient call, and ghost norms
    "convtranspose2d": (
        lambda: _head(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1)),
        (3, 4, 4),
        2,
    ),
    "convtranspose1d-groups-dilation-nobias": (
        lambda: _head(
            nn.ConvTranspose1d(4, 6, 3, stride=2, padding=2, output_padding=1, groups=2, dilation=2, bias=False)
        ),
        (4, 7),
        2,
    ),
    "convtranspose3d": (
        lambda: _head(nn.ConvTranspose3d(2, 3, 2, stride=(2, 1, 1), padding=(0, 1, 0))),
        (2, 3, 3, 2),
        2,
    ),
    "convtranspose2d-output-padding-beyond-stride": (  # allowed as the dilation is larger
        lambda: _head(nn.ConvTranspose2d(3, 4, 2, stride=2, dilation=3, output_padding=2)),
        (3, 3, 2),
        2,
    ),
    "convtranspose2d-output-size": (Upsample, (3, 4, 4), 2),
    "convtranspose2d-kernel-larger-than-activations": (
        lambda: _head(nn.ConvTranspose2d(8, 8, 3, padding=1)),
        (8, 3, 3),
        2,
    ),
    "convtranspose2d-ghost": (lambda: _head(nn.ConvTranspose2d(40, 40, 1, groups=2)), (40, 2, 2), 2),
    "convtranspose2d-twice": (
        lambda: Twice(nn.ConvTranspose2d(3, 3, 3, padding=1), _head(nn.Identity())),
        (3, 5, 5),
        2,
    ),
    "prelu": (lambda: nn.Sequential(nn.Linear(5, 6), nn.PReLU(init=0.3), nn.Linear(6, 3)), (5,), 3),
    "prelu-channels": (lambda: _head(nn.Conv2d(3, 4, 3), nn.PReLU(4, init=-0.2)), (3, 5, 5), 2),
    "prelu-twice": (lambda: Twice(nn.PReLU(init=0.5), nn.Linear(5, 3)), (5,), 3),
    "hf-conv1d": (lambda: nn.Sequential(Conv1D(7, 5), nn.Tanh(), nn.Flatten(), nn.Linear(7 * 6, 3)), (6, 5), 3),
    "hf-conv1d-ghost": (
        lambda: nn.Sequential(Conv1D(30, 30), nn.Tanh(), nn.Flatten(), nn.Linear(30 * 2, 3)),
        (2, 30),
        3,
    ),
    "hf-conv1d-one-position": (lambda: nn.Sequential(Conv1D(6, 5), nn.Tanh(), Conv1D(3, 6)), (5,), 3),
    "hf-conv1d-twice": (lambda: Twice(Conv1D(5, 5), nn.Sequential(nn.Flatten(), nn.Linear(5 * 6, 3))), (6, 5), 3),
    "convnext-layernorm2d": (lambda: _head(nn.Conv2d(3, 4, 3), LayerNorm2d(4)), (3, 5, 4), 2),
    "convnext-layernorm2d-nobias": (lambda: _head(nn.Conv2d(3, 4, 1), LayerNorm2d(4, bias=False)), (3, 2, 3), 2),
}


def _reference(net, inputs, labels, group_size=1):
    """Per-unit gradients by vmap(grad) (mean over each unit's rows), clipped and summed, in float64.

    The bound is the median norm, so that half the units are clipped. Returns (sums, norms, bound).
    """
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss_of_unit(trainable, x, y):
        return F.cross_entropy(functional_call(net, {**params, **trainable}, (x,)), y)

    units = inputs.reshape(-1, group_size, *inputs.shape[1:])
    unit_labels = labels.reshape(-1, group_size)
    per_unit = vmap(grad(loss_of_unit), in_dims=(None, 0, 0))({n: params[n] for n in names}, units, unit_labels)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_unit.values()))
    bound = float(norms.median())
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", factors, g) for n, g in per_unit.items()}, norms, bound


def _book_keeping(net, inputs, labels, bound, group_size=1):
    clipper = BookKeepingClipper(net, max_grad_norm=bound, group_size=group_size, norm_dtype=torch.float64)
    with clipper.recording():
        F.cross_entropy(net(inputs), labels).backward()
    norms = clipper.clip_and_sum(batch_size=inputs.shape[0])
    return {n: p.grad for n, p in net.named_parameters() if p.requires_grad}, norms


def _assert_equals_reference(got, norms, expected, expected_norms, rtol=1e-10):
    """Norms and clipped sums (on any device) equal the float64 vmap(grad) reference."""
    torch.testing.assert_close(norms.cpu(), expected_norms, rtol=rtol, atol=1e-12)
    for name in expected:
        torch.testing.assert_close(got[name].cpu(), expected[name], rtol=rtol, atol=1e-12, msg=name)


def _make(case, seed=0):
    build, shape, classes = CASES[case]
    torch.manual_seed(seed)
    net = build().double()
    inputs = torch.randn(8, *shape, dtype=torch.float64) * 3
    net(inputs)  # materialise lazy layers
    return net, inputs, torch.randint(classes, (8,))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_clipped_sum_equals_the_vmap_reference(case, device):
    """On a GPU the convolutions' per-example kernels are formed by unfolding, on a CPU by grouped convolutions."""
    net, inputs, labels = _make(case)
    expected, expected_norms, bound = _reference(net, inputs, labels)
    got, norms = _book_keeping(net.to(device), inputs.to(device), labels.to(device), bound)
    _assert_equals_reference(got, norms, expected, expected_norms)


@pytest.mark.parametrize("case", ["convnext-layernorm2d", "convtranspose2d", "convtranspose2d-ghost", "prelu-channels"])
def test_channels_last_images_are_clipped_exactly(case):
    """Weights and images in ``channels_last`` (mixed-precision conv nets on GPUs): the rules move and reshape the
    layers' inputs and output gradients, which then are not contiguous NCHW."""
    net, inputs, labels = _make(case)
    expected, expected_norms, bound = _reference(net, inputs, labels)
    net, inputs = net.to(memory_format=torch.channels_last), inputs.contiguous(memory_format=torch.channels_last)
    got, norms = _book_keeping(net, inputs, labels, bound)
    _assert_equals_reference(got, norms, expected, expected_norms)


def test_tokens_with_padding_and_repeated_tokens():
    torch.manual_seed(0)
    net = Tokens().double()
    tokens = torch.randint(0, 11, (8, 9))
    tokens[:, 0] = 3  # every example repeats a token, some have padding
    labels = torch.randint(3, (8,))
    expected, expected_norms, bound = _reference(net, tokens, labels)
    got, norms = _book_keeping(net, tokens, labels, bound)
    _assert_equals_reference(got, norms, expected, expected_norms)


def test_augmented_views_are_averaged_before_clipping():
    net, inputs, labels = _make("conv2d")
    labels = labels.reshape(4, 2)[:, :1].expand(4, 2).reshape(8)  # two views of each of four examples
    expected, expected_norms, bound = _reference(net, inputs, labels, group_size=2)
    got, norms = _book_keeping(net, inputs, labels, bound, group_size=2)
    _assert_equals_reference(got, norms, expected, expected_norms)


@pytest.mark.parametrize("size", [16, 32])
def test_wide_resnet_with_group_norm_and_weight_standardisation(size):
    """WRN-16-1 (the issue's network): at 32x32 (CIFAR) every layer's norms are instantiated; at 16x16 the last
    stage's standardised convolutions (4x4 positions, 64 channels) take the ghost path."""
    torch.manual_seed(0)
    net = wide_resnet(depth=16, widen=1, norm="group").double()
    inputs, labels = torch.randn(4, 3, size, size, dtype=torch.float64), torch.randint(10, (4,))
    expected, expected_norms, bound = _reference(net, inputs, labels)
    got, norms = _book_keeping(net, inputs, labels, bound)
    _assert_equals_reference(got, norms, expected, expected_norms, rtol=1e-9)


def test_no_ordinary_weight_gradient_is_computed_in_the_backward():
    net, inputs, labels = _make("conv2d")
    clipper = BookKeepingClipper(net, max_grad_norm=1.0)
    with clipper.recording():
        assert not any(p.requires_grad for p in net.parameters())
        F.cross_entropy(net(inputs), labels).backward()
        assert all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())
    clipper.clip_and_sum(batch_size=8)
    assert all(p.grad is not None for p in net.parameters())


def test_frozen_parameters_stay_frozen_and_get_no_gradient():
    net, inputs, labels = _make("linear")
    net[0].weight.requires_grad_(False)
    expected, _, bound = _reference(net, inputs, labels)
    got, _ = _book_keeping(net, inputs, labels, bound)
    assert net[0].weight.grad is None and not net[0].weight.requires_grad
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12)


def test_unsupported_and_tied_layers_are_refused_by_name():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.factor

    with pytest.raises(ValueError, match=r"Layer 1 \(Scale\).*grad_sample_mode='hooks'"):
        BookKeepingClipper(nn.Sequential(nn.Linear(3, 3), Scale()), max_grad_norm=1.0)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"1\.weight is the same tensor as 0\.weight"):
        BookKeepingClipper(tied, max_grad_norm=1.0)


def test_other_packages_layers_are_recognised_by_their_module_and_class_name_only():
    """HuggingFace's ``Conv1D`` and torchvision's ``LayerNorm2d`` have rules by qualified name (their packages are not
    imported); a class of the same name in another module, even with the same forward, has none and is refused."""
    assert {"transformers.pytorch_utils.Conv1D", "torchvision.models.convnext.LayerNorm2d"} <= set(
        supported_layer_names()
    )
    BookKeepingClipper(nn.Sequential(Conv1D(3, 4), LayerNorm2d(3)), max_grad_norm=1.0)
    lookalike = type("Conv1D", (Conv1D,), {"__module__": "my_models"})
    with pytest.raises(ValueError, match=r"Layer 0 \(Conv1D\) has trainable parameters but neither"):
        BookKeepingClipper(nn.Sequential(lookalike(3, 4)), max_grad_norm=1.0)


class Conv1DLaidOutAsLinear(nn.Module):
    """A layer under transformers' ``Conv1D`` name whose weight is ``[out, in]`` (``nn.Linear``'s layout)."""

    def __init__(self, outputs: int, inputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(outputs, inputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


Conv1DLaidOutAsLinear.__module__, Conv1DLaidOutAsLinear.__qualname__ = "transformers.pytorch_utils", "Conv1D"


def test_a_layer_known_by_name_with_another_weight_layout_is_refused_by_name():
    """The rule goes by the class's name: a weight of another shape than ``[in, out]`` crashed assigning ``.grad``."""
    net = nn.Sequential(Conv1DLaidOutAsLinear(3, 4), nn.Tanh(), nn.Linear(3, 2))
    clipper = BookKeepingClipper(net, max_grad_norm=1.0)
    refusal = r"transformers\.pytorch_utils\.Conv1D has a weight of shape \(3, 4\) for inputs of 4 and outputs of 3 "
    with pytest.raises(ValueError, match=refusal), clipper.recording():  # formed in the backward pass
        F.cross_entropy(net(torch.randn(5, 4)), torch.randint(2, (5,))).backward()


def test_a_layer_with_parameters_its_rule_does_not_form_is_refused_by_name():
    """The old ``torch.nn.utils.weight_norm`` gives a Linear ``weight_g`` and ``weight_v`` of its own: the Linear rule
    forms ``weight`` and ``bias`` only, so they never trained (no gradient), silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm is deprecated for the parametrization
        net = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 3)), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"Layer 0 \(Linear\) has trainable parameters \['weight_g', 'weight_v'\] "):
        BookKeepingClipper(net, max_grad_norm=1.0)


def test_a_parameter_beside_the_weight_of_a_layer_under_opacus_rule_is_refused_by_name():
    """An InstanceNorm (Opacus's rule inside the single backward) with an adapter registered on it: the rule forms
    weight and bias only, so the adapter's update was zero, silently."""
    net = nn.Sequential(nn.Linear(4, 12), nn.Unflatten(1, (3, 4)), nn.InstanceNorm1d(3, affine=True))
    net[2].register_parameter("adapter", nn.Parameter(torch.ones(1)))
    with pytest.raises(ValueError, match=r"Layer 2 \(InstanceNorm1d\) has trainable parameters \['adapter'\] "):
        BookKeepingClipper(net, max_grad_norm=1.0)


@pytest.mark.parametrize("entry", ["prelu_layernorm", "gpt_style"])
def test_the_zoo_models_with_prelu_and_transformers_conv1d_are_clipped_by_book_keeping(entry):
    """The zoo's MLP with PReLU and its GPT-2 block as ``transformers`` writes it (its ``Conv1D`` stand-in under the
    real class's module and name): ``"auto"`` now picks book-keeping, whose update is the clip-and-sum of vmap(grad)."""
    torch.manual_seed(0)
    module = zoo.ZOO[entry].build().double().train()
    named = type("Conv1D", (zoo._Conv1D,), {"__module__": "transformers.pytorch_utils"})
    for layer in module.modules():
        if type(layer) is zoo._Conv1D:
            layer.__class__ = named
    generator = torch.Generator().manual_seed(1)
    if entry == "gpt_style":  # position embeddings shared by the batch: frozen, as DP-SGD's refusal says
        module.net.wpe.requires_grad_(False)
        inputs = torch.randint(zoo.VOCAB, (12, zoo.LENGTH), generator=generator)
    else:
        inputs = torch.randn(12, 8, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 4, 12)[:, None]
    assert resolved_mode("auto", module, sensitivity_probe=False) == "bk"
    assert_the_update_is_the_clipped_sum("bk", module, inputs, torch.randint(3, (12,), generator=generator))


def test_a_parameter_registered_again_on_its_parent_and_used_there_is_refused_by_name():
    """``self.out = self.embedding.weight`` with ``F.linear(h, self.out)`` in the parent's forward: the parent is a
    layer of its own (only Opacus's DPLSTM-like modules re-register weights they don't use), refused without a rule."""

    class TiedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(5, 3)
            self.out = self.embedding.weight

        def forward(self, tokens):
            return F.linear(self.embedding(tokens).mean(dim=1), self.out)

    with pytest.raises(ValueError, match=r"Layer TiedHead \(TiedHead\) has trainable parameters but neither"):
        BookKeepingClipper(TiedHead(), max_grad_norm=1.0)


def test_a_second_backward_pass_in_one_step_is_refused_by_name():
    """An input-gradient penalty (double backprop: ``torch.autograd.grad(..., create_graph=True)`` before the loss's
    own backward) fires the layers' gradient hooks twice; it failed with an ``IndexError`` in the clipper."""
    net, inputs, labels = _make("linear")
    clipper = BookKeepingClipper(net, max_grad_norm=1.0)
    refusal = r"Layer '2' \(Linear\) received an output gradient a second time in one step: .*autograd\.grad"
    with pytest.raises(RuntimeError, match=refusal), clipper.recording():
        inputs = inputs.clone().requires_grad_(True)
        loss = F.cross_entropy(net(inputs), labels)
        (input_gradient,) = torch.autograd.grad(loss, inputs, create_graph=True)
        (loss + input_gradient.square().sum()).backward()
    assert all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("case", ["linear", "conv2d-ghost"])
def test_an_input_changed_in_place_after_its_norms_were_taken_is_refused(case):
    """The clipped sum is formed after the backward pass from the inputs the layer's norms were taken from: a hook
    later in the backward pass that changes the batch in place (the first layer's input) would make the two disagree,
    and release a clipped example above the bound."""
    net, inputs, labels = _make(case)
    clipper = BookKeepingClipper(net, max_grad_norm=1.0)
    with clipper.recording():
        batch = inputs.clone().requires_grad_(True)
        batch.register_hook(lambda gradient: batch.detach().mul_(2.0))  # after the first layer's norms
        F.cross_entropy(net(batch), labels).backward()
    with pytest.raises(RuntimeError, match=r"The input or output gradient of layer 0 was modified in place in the "):
        clipper.clip_and_sum(batch_size=8)


def test_batch_not_in_dimension_zero_is_refused():
    net = nn.Linear(4, 2)
    clipper = BookKeepingClipper(net, max_grad_norm=1.0)
    with clipper.recording():
        net(torch.randn(5, 3, 4)).sum().backward()  # sequence-first: [T, B, d]
    with pytest.raises(RuntimeError, match="batch in dimension 0"):
        clipper.clip_and_sum(batch_size=3)


PATHS = {  # case: (the layer, the path its weight's norms take under the cost rule)
    "conv2d-ghost": ("0", "ghost"),
    "standardized-conv-ghost": ("0", "ghost"),
    "standardized-conv-ghost-twice": ("layer", "ghost"),
    "standardized-conv-ghost-shortcut-added-in-place": ("conv", "ghost"),
    "standardized-conv-ghost-leaky-relu-in-place": ("conv", "ghost"),
    "convtranspose2d-ghost": ("0", "ghost"),
    "hf-conv1d-ghost": ("0", "ghost"),
    "conv2d": ("0", "instantiated"),
    "conv2d-twice": ("layer", "instantiated"),
    "standardized-conv": ("0", "instantiated"),
    "conv2d-kernel-larger-than-activations": ("0", "instantiated"),
    "convtranspose2d": ("0", "instantiated"),
    "convtranspose2d-kernel-larger-than-activations": ("0", "instantiated"),
    "linear-sequence": ("0", "instantiated"),
    "hf-conv1d": ("0", "instantiated"),
}


def test_every_ghost_case_is_pinned_to_the_ghost_path():
    assert {case for case in CASES if "ghost" in case} == {c for c, (_, path) in PATHS.items() if path == "ghost"}


@pytest.mark.parametrize("case", sorted(PATHS))
def test_each_case_takes_the_path_it_is_named_for(case, monkeypatch):
    """The ghost and instantiated rules are each checked against vmap only where a case takes them: a change of the
    cost rule that moved a ``*-ghost`` case to the instantiated path would leave the ghost rules (convolution, weight
    standardisation, transposed convolution, Linear) untested. Spies on the functions only one path calls, by the
    weight they serve."""
    from lightning_nt.privacy.book_keeping import conv, layers

    taken: dict[int, set[str]] = {}

    def spy(module, function, path, parameter_of):
        real = getattr(module, function)

        def spied(*args, **kwargs):
            taken.setdefault(id(parameter_of(*args)), set()).add(path)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, function, spied)

    spy(conv, "_ghost_norms", "ghost", lambda layer, *_: layer.weight)
    spy(conv, "conv_per_example_grads", "instantiated", lambda layer, *_: layer.weight)
    spy(layers, "Piece", "ghost", lambda parameter, *_: parameter)  # Linear's ghost branch builds its piece itself
    spy(layers, "per_unit_piece", "instantiated", lambda clipper, parameter, *_: parameter)
    net, inputs, labels = _make(case)
    layer, path = PATHS[case]
    _book_keeping(net, inputs, labels, 1.0)
    assert taken.get(id(net.get_submodule(layer).weight)) == {path}


@pytest.mark.parametrize("positions", [1, 3, 40])
def test_ghost_and_instantiated_norms_agree(positions):
    torch.manual_seed(positions)
    patches, grads = (
        torch.randn(4, positions, 7, dtype=torch.float64),
        torch.randn(4, positions, 5, dtype=torch.float64),
    )
    ghost = outer_product_norms(patches, grads, "ghost")
    torch.testing.assert_close(ghost, outer_product_norms(patches, grads, "instantiate"), rtol=1e-12, atol=0)
    torch.testing.assert_close(ghost, outer_product_norms(patches, grads, "auto"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["standardized-conv", "conv2d", "linear-sequence"])
def test_a_non_finite_example_contributes_zero_and_the_others_are_unchanged(case):
    net, inputs, labels = _make(case)
    expected, _, bound = _reference(net, inputs[1:], labels[1:])
    poisoned = inputs.clone()
    poisoned.view(len(poisoned), -1)[0, 0] = float("nan")
    got, norms = _book_keeping(net, poisoned, labels, bound)
    assert not torch.isfinite(norms[0]) and torch.isfinite(norms[1:]).all()
    for name in expected:  # the mean loss over 8 rows: per-example gradients are the same as over the 7 finite ones
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_carried_parts_add_up_to_the_whole_batch():
    net, inputs, labels = _make("conv2d")
    expected, _, bound = _reference(net, inputs, labels)
    clipper = BookKeepingClipper(net, max_grad_norm=bound, norm_dtype=torch.float64)
    for part, carry in ((slice(0, 3), True), (slice(3, 6), True), (slice(6, 8), False)):
        with clipper.recording():
            F.cross_entropy(net(inputs[part]), labels[part]).backward()
        clipper.clip_and_sum(batch_size=part.stop - part.start, carry=carry)
        assert all(p.grad is None for p in net.parameters()) == carry
    for name, parameter in net.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        nn.Conv2d(4, 6, 1, stride=2),
        StandardizedConv2d(3, 5, 3, padding=1),
    ],
    ids=["conv1d-groups", "conv2d-groups", "conv2d-1x1-stride", "standardized"],
)
def test_per_example_convolution_gradients_by_groups_and_by_unfolding_equal_vmap(conv):
    """Both ways of forming a convolution's per-example kernel gradients (CPU: grouped, GPU: unfold) against vmap."""
    torch.manual_seed(0)
    conv = conv.double()
    spatial = (9,) if isinstance(conv, nn.Conv1d) else (7, 6)
    inputs = torch.randn(5, conv.in_channels, *spatial, dtype=torch.float64)
    grads = torch.randn_like(conv(inputs))
    kernel = conv.weight.detach()

    def pairing(weight, x, g):  # <conv(x; w), g>: its gradient in w is the example's kernel gradient
        out = nn.functional.conv2d if isinstance(conv, nn.Conv2d) else nn.functional.conv1d
        return (out(x[None], weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)[0] * g).sum()

    expected = vmap(grad(pairing), in_dims=(None, 0, 0))(kernel, inputs, grads)
    for method in ("grouped", "unfold", "auto"):
        got = conv_per_example_grads(conv, inputs, grads, method)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=method)


@pytest.mark.parametrize(
    ("layer", "output_size"),
    [
        (nn.ConvTranspose1d(4, 6, 3, stride=2, padding=2, output_padding=1, groups=2, dilation=2), None),
        (nn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 3), padding=(1, 0), dilation=(3, 1), output_padding=(2, 1)), None),
        (nn.ConvTranspose2d(3, 4, 3, stride=3, padding=1), [11, 9]),
        (nn.ConvTranspose3d(2, 4, 2, stride=(1, 2, 1), groups=2), None),
    ],
    ids=["1d-groups-dilation", "2d-output-padding-beyond-stride", "2d-output-size", "3d-groups"],
)
def test_per_example_transposed_convolution_gradients_are_the_adjoint_convolutions(layer, output_size):
    """A transposed convolution's per-example kernel gradients as its adjoint convolution's (input: the output
    gradient; output gradient: the zero-extended input), by groups (CPU) and by unfolding (GPU), against vmap."""
    torch.manual_seed(0)
    layer = layer.double()
    inputs = torch.randn(5, layer.in_channels, *(4, 3, 2)[: len(layer.kernel_size)], dtype=torch.float64)
    grads = torch.randn_like(layer(inputs, output_size=output_size))

    def pairing(weight, x, g):  # <conv_transpose(x; w), g>: its gradient in w is the example's kernel gradient
        return (functional_call(layer, {"weight": weight}, (x[None], output_size), strict=False)[0] * g).sum()

    expected = vmap(grad(pairing), in_dims=(None, 0, 0))(layer.weight.detach(), inputs, grads)
    adjoint = _adjoint_convolution(layer)
    for method in ("grouped", "unfold"):
        got = conv_per_example_grads(adjoint, grads, _matched(adjoint, inputs, grads), method)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=method)


IN_PLACE = ["standardized-conv-ghost-shortcut-added-in-place", "standardized-conv-ghost-leaky-relu-in-place"]


@pytest.mark.parametrize("case", ["standardized-conv-ghost", "standardized-conv-ghost-twice", *IN_PLACE])
def test_a_clipped_example_is_released_within_the_bound(case):
    """Each example alone, every one clipped (C = 1e-3): its released gradient, formed from the recorded inputs and
    output gradients, has norm at most C, to float64 rounding (a relative 1e-10). A norm taken from a tensor changed
    after the layer produced it (an in-place ``out += shortcut`` on a standardised convolution's output) released
    examples above C, or, turned negative, as NaN, not at all."""
    net, inputs, labels = _make(case)
    clipper = BookKeepingClipper(net, max_grad_norm=1e-3, norm_dtype=torch.float64)
    for row in range(len(inputs)):
        with clipper.recording():
            F.cross_entropy(net(inputs[row : row + 1]), labels[row : row + 1]).backward()
        norms = clipper.clip_and_sum(batch_size=1)
        released = torch.sqrt(sum(p.grad.square().sum() for p in net.parameters()))
        assert norms.item() > 1e-3 and released <= 1e-3 * (1 + 1e-10), (row, float(released))


@pytest.mark.parametrize(
    "case",
    [
        "standardized-conv",
        "standardized-conv-ghost",
        *IN_PLACE,
        "conv2d-ghost",
        "linear-sequence",
        "convtranspose2d-ghost",
        "hf-conv1d-ghost",
    ],
)
def test_under_bf16_autocast_a_clipped_example_stays_within_the_bound(case):
    """The backward runs in bf16 but norms, factors and sums are fp32: one example's clipped gradient has norm <= C."""
    net, inputs, labels = _make(case)
    net = net.float()
    clipper = BookKeepingClipper(net, max_grad_norm=1e-5)  # every example clipped
    for row in range(len(inputs)):
        with clipper.recording(), torch.autocast("cpu", dtype=torch.bfloat16):
            F.cross_entropy(net(inputs[row : row + 1].float()), labels[row : row + 1]).backward()
        norms = clipper.clip_and_sum(batch_size=1)
        total = torch.sqrt(sum(p.grad.double().square().sum() for p in net.parameters()))
        assert norms.dtype == torch.float32 and norms.item() > 1e-5
        assert total <= 1e-5 * (1 + 1e-5), float(total)


@pytest.mark.parametrize("case", ["linear", "linear-sequence", "hf-conv1d-ghost"])
def test_clipped_sums_taken_inside_the_users_autocast_stay_within_the_bound(case):
    """The public API called inside the user's bf16 autocast block: the sums ran in bf16 beside fp32 norms and one
    example's clipped gradient came out up to 1.001 C (found by review); TF32 flags set by the user are restored."""
    net, inputs, labels = _make(case)
    net = net.float()
    clipper = BookKeepingClipper(net, max_grad_norm=1e-5)
    matmul, convolution = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    for row in range(len(inputs)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with clipper.recording():
                F.cross_entropy(net(inputs[row : row + 1].float()), labels[row : row + 1]).backward()
            clipper.clip_and_sum(batch_size=1)
        total = torch.sqrt(sum(p.grad.double().square().sum() for p in net.parameters()))
        assert total <= 1e-5 * (1 + 1e-5), float(total)
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == (matmul, convolution)


def test_full_precision_turns_tf32_and_autocast_off_and_restores_them():
    from lightning_nt.privacy.book_keeping.clipper import full_precision

    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")  # what Lightning suggests on tensor-core GPUs
    try:
        with pytest.raises(RuntimeError, match="boom"), full_precision("cpu"):
            assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
            assert not torch.is_autocast_enabled("cpu")
            raise RuntimeError("boom")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32 == before[1]
    finally:
        torch.set_float32_matmul_precision(before[0])


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("module", "net"),
        ("module", None),
        ("max_grad_norm", "1"),
        ("max_grad_norm", float("nan")),
        ("max_grad_norm", float("inf")),
        ("max_grad_norm", 0.0),
        ("max_grad_norm", -1),
        ("max_grad_norm", True),
        ("loss_reduction", "avg"),
        ("loss_reduction", 1),
        ("group_size", 0),
        ("group_size", 1.5),
        ("group_size", "2"),
        ("group_size", True),
        ("group_size", float("nan")),
        ("norm_dtype", "float32"),
        ("norm_dtype", torch.int64),
        ("norm_dtype", None),
    ],
)
def test_bad_arguments_are_refused_by_name(name, value):
    arguments = {"module": nn.Linear(3, 2), "max_grad_norm": 1.0, name: value}
    with pytest.raises(ArgumentError, match=f"`{name}`"):
        BookKeepingClipper(**arguments)


def test_layers_of_different_dtypes_are_clipped_together():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6).double(), Cast(torch.float32), nn.Tanh(), nn.Linear(6, 3))
    inputs, labels = torch.randn(8, 5, dtype=torch.float64) * 3, torch.randint(3, (8,))
    in_float64 = copy.deepcopy(net).double()
    in_float64[1].dtype = torch.float64
    expected, expected_norms, bound = _reference(in_float64, inputs, labels)
    clipper = BookKeepingClipper(net, max_grad_norm=bound)
    with clipper.recording():
        F.cross_entropy(net(inputs), labels).backward()
    norms = clipper.clip_and_sum(batch_size=8)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-5, atol=1e-6)
    for name, parameter in net.named_parameters():
        assert parameter.grad.dtype == parameter.dtype
        torch.testing.assert_close(parameter.grad, expected[name].to(parameter.dtype), rtol=1e-5, atol=1e-6)


def test_a_parameter_frozen_after_the_clipper_was_built_stays_frozen():
    net, inputs, labels = _make("linear")
    clipper = BookKeepingClipper(net, max_grad_norm=1.0, norm_dtype=torch.float64)
    net[0].weight.requires_grad_(False)
    with clipper.recording():
        F.cross_entropy(net(inputs), labels).backward()
    clipper.clip_and_sum(batch_size=8)
    assert not net[0].weight.requires_grad
