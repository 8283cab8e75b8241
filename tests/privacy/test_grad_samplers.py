import pytest
import torch
import torch.nn.functional as F
from opacus.grad_sample.utils import prepare_module
from torch import nn
from torch.func import functional_call, grad, vmap

import lightning_nt.privacy  # noqa: F401  (registers the rule)
from lightning_nt.demos import StandardizedConv2d


def test_weight_standardised_convolution_per_example_gradients_equal_vmap():
    torch.manual_seed(0)
    net = nn.Sequential(StandardizedConv2d(3, 4, 3, padding=1, bias=True), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    inputs, labels = torch.randn(6, 3, 5, 5), torch.randint(2, (6,))
    names = [n for n, _ in net.named_parameters()]

    def loss_of_one(params, x, y):
        return F.cross_entropy(functional_call(net, dict(zip(names, params)), (x[None],)), y[None])

    reference = vmap(grad(loss_of_one), in_dims=(None, 0, 0))([p.detach() for p in net.parameters()], inputs, labels)
    hooks = prepare_module(net, grad_sample_mode="hooks", wrap_model=False, loss_reduction="sum")
    assert type(net[0]) in hooks.GRAD_SAMPLERS  # no functorch fallback
    F.cross_entropy(net(inputs), labels, reduction="sum").backward()
    for p, expected in zip(net.parameters(), reference):
        torch.testing.assert_close(p.grad_sample, expected, rtol=1e-4, atol=1e-5)
    hooks.cleanup()


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOLERANCES = {"cpu": {"rtol": 1e-5, "atol": 1e-6}, "cuda": {"rtol": 1e-3, "atol": 1e-4}}  # TF32 kernels on CUDA


def _per_example_reference(layer, calls, labels):
    """Each example's gradient of the table by autograd on that example alone (``calls[i]`` runs its forward)."""
    head = nn.Linear(layer.embedding_dim, 3, device=layer.weight.device)
    gradients = []
    for call, label in zip(calls, labels):
        (gradient,) = torch.autograd.grad(F.cross_entropy(head(call(layer))[None], label[None]), layer.weight)
        gradients.append(gradient)
    return head, torch.stack(gradients)


def _hooked_samples(layer, head, forward, labels):
    hooks = prepare_module(layer, grad_sample_mode="hooks", wrap_model=False, loss_reduction="sum")
    F.cross_entropy(head(forward(layer)), labels, reduction="sum").backward()
    samples = layer.weight.grad_sample
    hooks.cleanup()
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_per_example_gradients_leave_the_padding_row_at_zero_as_pytorch(device):
    # Opacus's rule gave the padding row a gradient, so DP-SGD trained the padding vector
    torch.manual_seed(0)
    layer = nn.Embedding(7, 4, padding_idx=0, device=device)
    tokens, labels = torch.tensor([[0, 3, 3, 1], [2, 0, 0, 5]], device=device), torch.tensor([1, 2], device=device)
    head, reference = _per_example_reference(layer, [lambda e, t=t: e(t).mean(0) for t in tokens], labels)
    samples = _hooked_samples(layer, head, lambda e: e(tokens).mean(1), labels)
    assert reference[:, 0].abs().max() == 0
    torch.testing.assert_close(samples, reference, **TOLERANCES[device])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("mode", "padding_idx"), [("mean", None), ("sum", None), ("mean", 0), ("sum", 0)])
def test_embedding_bag_per_example_gradients_equal_each_examples_own(mode, padding_idx, device):
    # 2-D input crashed inside Opacus ("not enough values to unpack"); a token repeated in a bag was counted once
    torch.manual_seed(0)
    layer = nn.EmbeddingBag(7, 4, mode=mode, padding_idx=padding_idx, device=device)
    tokens = torch.tensor([[0, 3, 3, 1], [2, 0, 5, 5], [4, 4, 4, 4]], device=device)
    labels = torch.tensor([1, 2, 0], device=device)
    head, reference = _per_example_reference(layer, [lambda e, t=t: e(t[None])[0] for t in tokens], labels)
    samples = _hooked_samples(layer, head, lambda e: e(tokens), labels)
    torch.testing.assert_close(samples, reference, **TOLERANCES[device])


def test_embedding_bag_on_1d_input_is_refused_naming_the_fix():
    # Opacus counts examples by the inputs' first dimension: 1-D input with offsets has no per-example rows
    layer = nn.EmbeddingBag(7, 4)
    hooks = prepare_module(layer, grad_sample_mode="hooks", wrap_model=False, loss_reduction="sum")
    with pytest.raises(ValueError, match="2-D input"):
        layer(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2])).sum().backward()
    hooks.cleanup()


@pytest.mark.parametrize("device", DEVICES)
def test_convolution_per_example_gradients_on_a_channels_last_input_equal_vmap(device):
    # Opacus's rule read a channels_last input in memory order: per-example gradients that didn't even sum to the
    # gradient, so DP-SGD trained the model with wrong clipped gradients
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 2))
    net = net.to(device=device, memory_format=torch.channels_last)
    inputs, labels = torch.randn(5, 2, 4, 4, device=device), torch.randint(2, (5,), device=device)
    names = [n for n, _ in net.named_parameters()]

    def loss_of_one(params, x, y):
        return F.cross_entropy(functional_call(net, dict(zip(names, params)), (x[None],)), y[None])

    reference = vmap(grad(loss_of_one), in_dims=(None, 0, 0))([p.detach() for p in net.parameters()], inputs, labels)
    hooks = prepare_module(net, grad_sample_mode="hooks", wrap_model=False, loss_reduction="sum")
    F.cross_entropy(net(inputs.contiguous(memory_format=torch.channels_last)), labels, reduction="sum").backward()
    for p, expected in zip(net.parameters(), reference):
        torch.testing.assert_close(p.grad_sample, expected, **TOLERANCES[device])
    hooks.cleanup()
