"""The update without a host read (what runs on CUDA), forced on the CPU: same averages as the host path, bit for bit.

On CUDA, `RunningWeightAverage.update` keeps the finiteness flag, the update weight and the counts on the device, so the
CPU never waits for the kernels a training step queued. Off CUDA it reads the flag on the host (waiting costs nothing
there). `RunningWeightAverage._device_path` forces either path, so both are checked here against a closed form and
against each other; `tests/averaging/test_cuda.py` checks the device path on a GPU, with no host sync.
"""

import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_nt import IterateAveraging
from lightning_nt.averaging import RunningWeightAverage
from tests.averaging.test_faults import PoisonOneStep
from tests.helpers import TinyClassifier, read_tensorboard_scalars, tiny_trainer

NAN_STEPS, INF_STEPS = (0, 5, 17), (9, 23)  # the first iterate too: it would seed the average
STEPS = 30
CASES = [("uniform", None, None), ("ema", 0.9, None), ("ema", 0.99, 0.75)]


def _net(dtype: torch.dtype) -> nn.Module:
    """Tensors large enough for the vectorised kernels, a BatchNorm for buffers (floating and integer)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 33), nn.BatchNorm1d(33), nn.Linear(33, 5)).to(dtype)


def _drive(average: RunningWeightAverage, net: nn.Module, steps: range) -> list[dict[str, torch.Tensor] | None]:
    """Set the weights of step s (NaN in one weight at NAN_STEPS, -inf in a bias at INF_STEPS), update, and return
    each iterate in float64 (None for a non-finite one)."""
    iterates = []
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for tensor in [*net.parameters(), net[1].running_mean, net[1].running_var]:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 2 + 1)
            net[1].num_batches_tracked.fill_(step)
            finite = {name: t.double().clone() for name, t in average._named_tensors(net) if t.is_floating_point()}
            if step in NAN_STEPS:
                net[0].weight[3, 7] = float("nan")
            if step in INF_STEPS:
                net[2].bias[1] = float("-inf")
        iterates.append(None if step in NAN_STEPS + INF_STEPS else finite)
        average.update(net)
    return iterates


def _average(device_path: bool, mode: str, decay: float | None, warmup: float | None, dtype: torch.dtype):
    net = _net(dtype)
    average = RunningWeightAverage(net, mode=mode, decay=decay, warmup=warmup, buffers=True)
    average._device_path = device_path
    return average, net


def _closed_form(iterates: list, mode: str, decay: float | None, warmup: float | None) -> dict[str, torch.Tensor]:
    """Uniform: the mean of the finite iterates. EMA: sum_i x_i w_i prod_{j>i} (1 - w_j) over them, the first one
    with weight 1, update t's weight 1 - min(decay, 1 - (1 + t) ** -warmup)."""
    kept = [iterate for iterate in iterates if iterate is not None]
    if mode == "uniform":
        return {name: sum(iterate[name] for iterate in kept) / len(kept) for name in kept[0]}
    weights = [1.0] + [1.0 - min(decay, 1.0 - (1.0 + t) ** -warmup if warmup else decay) for t in range(1, len(kept))]
    return {
        name: sum(
            iterate[name] * weight * math.prod(1.0 - later for later in weights[i + 1 :])
            for i, (iterate, weight) in enumerate(zip(kept, weights))
        )
        for name in kept[0]
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("mode", "decay", "warmup"), CASES)
@pytest.mark.parametrize("device_path", [False, True])
def test_both_paths_match_the_closed_form_with_nan_and_inf_iterates_left_out(device_path, mode, decay, warmup, dtype):
    average, net = _average(device_path, mode, decay, warmup, dtype)
    iterates = _drive(average, net, range(STEPS))
    kept = sum(iterate is not None for iterate in iterates)
    assert (average.n_averaged, average.n_skipped) == (kept, STEPS - kept)
    expected = _closed_form(iterates, mode, decay, warmup)
    for name, value in expected.items():
        assert average.state[name].dtype == torch.float32, name
        torch.testing.assert_close(average.state[name].double(), value, rtol=1e-5, atol=1e-5, msg=name)
    assert average.state["1.num_batches_tracked"].item() == STEPS - 1  # copied from the last finite iterate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("mode", "decay", "warmup"), CASES)
def test_the_device_path_gives_the_host_path_s_averages_bit_for_bit(mode, decay, warmup, dtype):
    host, host_net = _average(False, mode, decay, warmup, dtype)
    device, device_net = _average(True, mode, decay, warmup, dtype)
    _drive(host, host_net, range(STEPS))
    _drive(device, device_net, range(STEPS))
    assert (device.n_averaged, device.n_skipped) == (host.n_averaged, host.n_skipped)
    assert host.state.keys() == device.state.keys()
    for name, value in host.state.items():
        assert torch.equal(device.state[name], value), name


def test_the_device_path_returns_the_flag_as_a_tensor_and_a_skipped_first_iterate_leaves_no_average():
    average, net = _average(True, "uniform", None, None, torch.float32)
    with torch.no_grad():
        net[0].weight[0, 0] = float("inf")
    flag = average.update(net)
    assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and flag.shape == () and not flag
    assert (average.n_averaged, average.n_skipped) == (0, 1) and average.state == {}
    assert average.state_dict() == {"n_averaged": 0, "n_skipped": 1, "average": {}}
    with pytest.raises(RuntimeError, match="call `update` at least once"), average.swapped_in(net):
        pass
    with torch.no_grad():
        net[0].weight[0, 0] = 1.0
    assert average.update(net) and average.n_averaged == 1
    assert torch.equal(average.state["0.weight"], net[0].weight)
    host, host_net = _average(False, "uniform", None, None, torch.float32)
    assert host.update(host_net) is True  # the host path keeps returning a bool


@pytest.mark.parametrize("device_path", [False, True])
def test_a_module_without_tensors_is_counted_on_either_path(device_path):
    """Nothing to average (no parameter, buffers not averaged): the update is counted, the state is empty."""
    module = nn.Module()
    module.register_buffer("steps", torch.zeros(3, dtype=torch.long))
    average = RunningWeightAverage(module)
    average._device_path = device_path
    assert bool(average.update(module)) and bool(average.update(module))
    assert (average.n_averaged, average.n_skipped, average.state) == (2, 0, {})


@pytest.mark.parametrize("device_path", [False, True])
def test_an_empty_parameter_is_averaged_beside_the_others(device_path):
    """Found by review: the fused finiteness check (a maximum) refused a zero-size parameter, on CUDA too."""
    net = nn.Linear(3, 2)
    net.register_parameter("empty", nn.Parameter(torch.empty(0)))
    average = RunningWeightAverage(net, mode="ema", decay=0.5)
    average._device_path = device_path
    assert bool(average.update(net)) and average.n_averaged == 1
    assert average.state["empty"].shape == (0,) and torch.equal(average.state["weight"], net.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device_path", [False, True])
def test_huge_finite_weights_are_averaged_not_taken_for_an_overflow(device_path, dtype):
    """Weights whose squares (and sum) overflow are finite: the iterate is folded in, not skipped."""
    average, net = _average(device_path, "uniform", None, None, dtype)
    with torch.no_grad():
        net[0].weight.fill_(3e38)
        net[0].weight[0, 0] = -3e38
    assert bool(average.update(net)) and (average.n_averaged, average.n_skipped) == (1, 0)
    assert torch.equal(average.state["0.weight"], net[0].weight.float())


@pytest.mark.parametrize("device_path", [False, True])
def test_counts_and_averages_survive_a_checkpoint_round_trip(device_path, tmp_path):
    whole, net = _average(device_path, "ema", 0.99, 0.75, torch.bfloat16)
    _drive(whole, net, range(STEPS))
    first, net = _average(device_path, "ema", 0.99, 0.75, torch.bfloat16)
    _drive(first, net, range(12))
    torch.save(first.state_dict(), tmp_path / "average.pt")
    saved = torch.load(tmp_path / "average.pt", weights_only=True)
    assert (saved["n_averaged"], saved["n_skipped"]) == (9, 3) and isinstance(saved["n_skipped"], int)
    resumed, net = _average(device_path, "ema", 0.99, 0.75, torch.bfloat16)
    resumed.load_state_dict(saved)
    _drive(resumed, net, range(12, STEPS))
    assert (resumed.n_averaged, resumed.n_skipped) == (whole.n_averaged, whole.n_skipped)
    for name, value in whole.state.items():
        assert torch.equal(resumed.state[name], value), name


def test_the_callback_warns_once_with_the_count_when_skips_are_read_later(tmp_path, monkeypatch):
    """On the device path the callback learns of a skip only when it reads the count (epoch end, validation)."""
    monkeypatch.setattr(RunningWeightAverage, "_device_path", True)
    pl.seed_everything(0)
    poison, averaging = PoisonOneStep(step=4), IterateAveraging()
    module = TinyClassifier(num_samples=96)
    with pytest.warns(UserWarning, match=r"1 iterate\(s\) since step 0 were not finite") as caught:
        tiny_trainer(tmp_path, max_epochs=2, callbacks=[poison, averaging]).fit(module)
    assert sum("not finite" in str(w.message) for w in caught) == 1
    assert (averaging.n_averaged, averaging.n_skipped) == (11, 1)
    expected = torch.stack([poison.iterates[s] for s in range(1, 13) if s != 4]).mean(0)
    torch.testing.assert_close(averaging.averaged_state_dict()["net.0.weight"], expected, rtol=0, atol=1e-6)
    assert torch.isfinite(module.net[0].weight).all()
    assert read_tensorboard_scalars(tmp_path)["averaging/skipped"][-1][1] == 1.0


def test_the_device_path_never_reads_a_tensor_on_the_host(monkeypatch):
    """What `torch.cuda.set_sync_debug_mode("error")` checks on a GPU (test_cuda.py), checked on the CPU: no tensor is
    turned into a Python value during an update, neither a finite one nor a skipped one, nor the first."""
    average, net = _average(True, "ema", 0.99, 0.75, torch.bfloat16)

    def host_read(*args, **kwargs):
        raise AssertionError("the update read a tensor on the host")

    with monkeypatch.context() as patch:
        for method in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist", "cpu", "numpy"):
            patch.setattr(torch.Tensor, method, host_read)
        _drive(average, net, range(12))
    assert (average.n_averaged, average.n_skipped) == (9, 3)
