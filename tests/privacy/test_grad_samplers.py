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
