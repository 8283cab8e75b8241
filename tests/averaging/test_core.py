import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_nt.averaging import (
    IterateAverage,
    decay_per_update,
    load_averaged_weights,
    recompute_batchnorm,
    save_averaged_weights,
)


def _iterates(net: nn.Module, count: int, seed: int = 0):
    """Drive `net` through `count` random weight settings, yielding after each; record them in fp64."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 3 + 1)
        yield {name: p.detach().double().clone() for name, p in net.named_parameters()}


def test_uniform_is_the_plain_mean():
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    average = IterateAverage(net, mode="uniform")
    recorded = []
    for iterate in _iterates(net, 200):
        average.update(net)
        recorded.append(iterate)
    assert average.n_averaged == 200
    for name, value in average.state.items():
        expected = torch.stack([r[name] for r in recorded]).mean(0)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("warmup", [None, 0.75])
def test_ema_matches_the_recursion_in_fp64(warmup):
    net = nn.Linear(4, 3)
    decay = 0.9
    average = IterateAverage(net, mode="ema", decay=decay, warmup=warmup)
    expected = None
    for t, iterate in enumerate(_iterates(net, 40)):
        average.update(net)
        if expected is None:
            expected = iterate
        else:
            d = decay if warmup is None else min(decay, 1 - (1 + t) ** -warmup)
            expected = {n: d * expected[n] + (1 - d) * iterate[n] for n in iterate}
    for name, value in average.state.items():
        torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-5)


def test_ema_weights_closed_form():
    average = IterateAverage(nn.Linear(1, 1), mode="ema", decay=0.99, warmup=1.0)
    assert [average.weight(t) for t in range(3)] == pytest.approx([1 - min(0.99, 1 - 1 / (1 + t)) for t in range(3)])
    assert IterateAverage(nn.Linear(1, 1)).weight(4) == 0.2


def test_bf16_module_gets_fp32_averages():
    net = nn.Linear(16, 16).to(torch.bfloat16)
    average = IterateAverage(net, mode="uniform")
    recorded = []
    for iterate in _iterates(net, 300):
        average.update(net)
        recorded.append(iterate)
    expected = torch.stack([r["weight"] for r in recorded]).mean(0)
    assert average.state["weight"].dtype == torch.float32
    error = (average.state["weight"].double() - expected).abs().max().item()
    bf16_error = (expected.to(torch.bfloat16).double() - expected).abs().max().item()
    assert error < 1e-5 < bf16_error


def test_integer_buffers_are_copied_and_float_buffers_averaged():
    net = nn.BatchNorm1d(3)
    average = IterateAverage(net, mode="uniform", buffers=True)
    means = []
    for step in range(1, 4):
        net.running_mean.fill_(float(step))
        net.num_batches_tracked.fill_(10 * step)
        means.append(float(step))
        average.update(net)
    assert average.state["num_batches_tracked"].dtype == torch.int64
    assert average.state["num_batches_tracked"].item() == 30
    assert torch.equal(average.state["running_mean"], torch.full((3,), 2.0))


def test_swap_in_and_back_is_bitwise():
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    average = IterateAverage(net, mode="uniform")
    for _ in _iterates(net, 3):
        average.update(net)
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with average.swapped_in(net):
        assert torch.equal(net[0].weight, average.state["0.weight"])
        net.train()(torch.randn(4, 3))  # disturbs BN buffers inside the block
    for name, value in net.state_dict().items():
        assert torch.equal(value, raw[name]), name


def test_swap_before_any_update_is_refused():
    with pytest.raises(RuntimeError, match="update"), IterateAverage(nn.Linear(1, 1)).swapped_in(nn.Linear(1, 1)):
        pass


def test_batchnorm_recompute_equals_update_bn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8, momentum=0.3))
    batches = [torch.randn(10, 4) * (i + 1) for i in range(5)]
    reference = nn.Sequential(*[m for m in net])  # same modules; snapshot below
    update_bn([(b,) for b in batches], reference)
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.fill_(5.0)
    net.eval()
    recompute_batchnorm(net, (net(b) for b in batches))
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)
    assert not net.training and net[4].momentum == 0.3


def test_save_and_load_without_a_trainer(tmp_path):
    net = nn.Linear(3, 2)
    average = IterateAverage(net)
    for _ in _iterates(net, 4):
        average.update(net)
    save_averaged_weights(average.state, tmp_path / "avg.pt")
    fresh = nn.Linear(3, 2)
    assert load_averaged_weights(fresh, tmp_path / "avg.pt") == []
    assert torch.equal(fresh.weight, average.state["weight"])
    with pytest.raises(KeyError, match="strict=False"):
        load_averaged_weights(nn.Linear(3, 2, bias=False), tmp_path / "avg.pt")


def test_decay_per_update():
    assert decay_per_update(decay=0.9, every_n_steps=2) == pytest.approx(0.81)
    assert decay_per_update(half_life=5, every_n_steps=5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="exactly one"):
        decay_per_update(decay=0.9, half_life=3)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"mode": "median"}, "mode"),
        ({"mode": "ema", "decay": 1.0}, "decay"),
        ({"mode": "ema", "decay": 0.9, "warmup": 0}, "warmup"),
    ],
)
def test_bad_input(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        IterateAverage(nn.Linear(1, 1), **kwargs)


@pytest.mark.parametrize("compiled", ["saved", "loaded"])
def test_averaged_weights_load_into_the_network_compiled_the_other_way(compiled, tmp_path):
    def network(compile_it):
        torch.manual_seed(0)
        inner = nn.Linear(3, 2)
        return nn.Sequential(torch.compile(inner, backend="eager") if compile_it else inner)

    source, target = network(compiled == "saved"), network(compiled == "loaded")
    with torch.no_grad():
        target[0].weight.zero_()
    save_averaged_weights(source.state_dict(), tmp_path / "avg.pt")
    assert load_averaged_weights(target, tmp_path / "avg.pt") == []
    assert torch.equal(
        target.state_dict()[next(iter(target.state_dict()))], source.state_dict()[next(iter(source.state_dict()))]
    )
