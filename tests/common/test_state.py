import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_nt.common import preserved_rng, preserved_state


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))
    net(torch.randn(8, 4)).sum().backward()
    net[3].weight.grad = None
    return net.eval()


def _everything(net: nn.Module):
    return (
        [p.detach().clone() for p in net.parameters()],
        [b.clone() for b in net.buffers()],
        [None if p.grad is None else p.grad.clone() for p in net.parameters()],
        [m.training for m in net.modules()],
    )


def _assert_same(a, b):
    for left, right in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(left, right)
    for left, right in zip(a[2], b[2]):
        assert (left is None and right is None) or torch.equal(left, right)
    assert a[3] == b[3]


def test_everything_restored_bitwise_and_in_place():
    net = _net()
    before = _everything(net)
    identities = [id(p) for p in net.parameters()]
    grad_identities = [id(p.grad) for p in net.parameters()]
    expected_draws = (torch.rand(3), random.random(), np.random.rand())
    _ = net(torch.zeros(1, 4))  # no RNG use in eval mode
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    reference = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    with preserved_state(net):
        net.train()
        out = net(torch.randn(8, 4))
        out.sum().backward()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        random.random(), np.random.rand()
    _assert_same(before, _everything(net))
    assert [id(p) for p in net.parameters()] == identities
    assert [id(p.grad) for p in net.parameters()] == grad_identities
    assert expected_draws is not None
    drawn = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(drawn[0], reference[0]) and drawn[1:] == reference[1:]


def test_restored_on_error():
    net = _net()
    before = _everything(net)
    with pytest.raises(RuntimeError, match="boom"), preserved_state(net):
        with torch.no_grad():
            net[0].weight.mul_(0)
        net[1].running_mean.fill_(3.0)
        raise RuntimeError("boom")
    _assert_same(before, _everything(net))


def test_parts_can_be_left_alone():
    net = _net()
    with preserved_state(net, buffers=False), torch.no_grad():
        net.train()(torch.randn(8, 4))
    assert not torch.equal(net[1].running_mean, torch.zeros(6))
    assert not net.training


def test_extra_generator_restored():
    generator = torch.Generator().manual_seed(3)
    expected = torch.rand(2, generator=torch.Generator().manual_seed(3))
    with preserved_rng(generator):
        torch.rand(5, generator=generator)
    assert torch.equal(torch.rand(2, generator=generator), expected)


class RegistersOnFirstCall(nn.Module):
    """Creates its state from the first batch it sees (data-dependent initialisation)."""

    def forward(self, inputs):
        if not hasattr(self, "center"):
            self.register_buffer("center", inputs.detach().mean(0))
            self.gain = nn.Parameter(torch.ones(inputs.shape[1]))
        return (inputs - self.center) * self.gain


def test_state_registered_in_the_block_is_removed_and_the_rest_restored_by_name():
    """Before: buffers were restored by position, so one registered in the block shifted every later one (``scale``'s
    7s landed in ``center``), and the block's registration stayed, made from the block's batch."""
    net = nn.Module()
    net.pre, net.post = RegistersOnFirstCall(), nn.Module()
    net.post.register_buffer("scale", torch.full((4,), 7.0))
    with preserved_state(net):
        net.pre(torch.randn(8, 4))
        net.post.scale.zero_()
    assert sorted(name for name, _ in net.named_buffers()) == ["post.scale"]
    assert [name for name, _ in net.named_parameters()] == []
    assert torch.equal(net.post.scale, torch.full((4,), 7.0))
    net.pre(torch.ones(2, 4))  # the run registers it from its own batch, as it would have without the block
    assert torch.equal(net.pre.center, torch.ones(4))
